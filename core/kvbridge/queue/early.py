"""Moved to :mod:`kvbridge.protocol.early`; this old path is kept for one release."""

from kvbridge.protocol.early import *  # noqa: F403
