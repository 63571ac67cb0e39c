"""Moved to :mod:`kvbridge.transport.hookspecs`; this old path is kept for one release."""

from kvbridge.transport.hookspecs import *  # noqa: F403
