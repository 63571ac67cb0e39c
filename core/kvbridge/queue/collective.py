"""Moved to :mod:`kvbridge.runtime.collective`; this old path is kept for one release."""

from kvbridge.runtime.collective import *  # noqa: F403
