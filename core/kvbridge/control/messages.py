"""Moved to :mod:`kvbridge.protocol.messages`; this old path is kept for one release."""

from kvbridge.protocol.messages import *  # noqa: F403
