"""Moved to :mod:`kvbridge.transport.facade`; this old path is kept for one release."""

from kvbridge.transport.facade import *  # noqa: F403
