"""Moved to :mod:`kvbridge.transport.kit`; this old path is kept for one release."""

from kvbridge.transport.kit import *  # noqa: F403
