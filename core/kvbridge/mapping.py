"""Moved to :mod:`kvbridge.protocol.mapping`; this old path is kept for one release."""

from kvbridge.protocol.mapping import *  # noqa: F403
