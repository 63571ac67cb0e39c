"""Moved to :mod:`kvbridge.protocol.outcomes`; this old path is kept for one release."""

from kvbridge.protocol.outcomes import *  # noqa: F403
