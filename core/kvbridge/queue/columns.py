"""Moved to :mod:`kvbridge.protocol.columns`; this old path is kept for one release."""

from kvbridge.protocol.columns import *  # noqa: F403
