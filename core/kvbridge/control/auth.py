"""Moved to :mod:`kvbridge.protocol.auth`; this old path is kept for one release."""

from kvbridge.protocol.auth import *  # noqa: F403
