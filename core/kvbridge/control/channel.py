"""Moved to :mod:`kvbridge.runtime.control`; this old path is kept for one release."""

from kvbridge.runtime.control import *  # noqa: F403
