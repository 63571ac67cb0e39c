"""Moved to :mod:`kvbridge.runtime.prefill_session`; this old path is kept for one release."""

from kvbridge.runtime.prefill_session import *  # noqa: F403
