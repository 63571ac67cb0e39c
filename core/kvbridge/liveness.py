"""Moved to :mod:`kvbridge.protocol.liveness`; this old path is kept for one release."""

from kvbridge.protocol.liveness import *  # noqa: F403
