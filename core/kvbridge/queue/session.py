"""Moved to :mod:`kvbridge.runtime` (the sessions and what they exchange with their wiring);
this old path is kept for one release."""

from kvbridge.runtime.decode_session import DecodeSession as DecodeSession
from kvbridge.runtime.prefill_session import PrefillSession as PrefillSession
from kvbridge.runtime.wiring import *  # noqa: F403
