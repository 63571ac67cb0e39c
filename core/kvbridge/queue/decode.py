"""Moved to :mod:`kvbridge.protocol.decode`; this old path is kept for one release."""

from kvbridge.protocol.decode import *  # noqa: F403
