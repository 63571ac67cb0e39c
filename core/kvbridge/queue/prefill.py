"""Moved to :mod:`kvbridge.protocol.prefill`; this old path is kept for one release."""

from kvbridge.protocol.prefill import *  # noqa: F403
