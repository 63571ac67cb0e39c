"""Moved to :mod:`kvbridge.runtime.decode_session`; this old path is kept for one release."""

from kvbridge.runtime.decode_session import *  # noqa: F403
