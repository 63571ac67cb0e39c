"""Moved to :mod:`kvbridge.runtime.wiring`; this old path is kept for one release."""

from kvbridge.runtime.wiring import *  # noqa: F403
