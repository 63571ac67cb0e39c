"""Moved to :mod:`kvbridge.runtime.decode_node` and :mod:`kvbridge.runtime.prefill_node` (both
exported by :mod:`kvbridge`); this old path is kept for one release."""

from kvbridge.runtime.decode_node import DecodeNode as DecodeNode
from kvbridge.runtime.prefill_node import PrefillNode as PrefillNode
