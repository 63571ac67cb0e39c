"""Moved: the queues to :mod:`kvbridge.protocol`, the sessions and reducers to
:mod:`kvbridge.runtime`. This old package (and its modules) is kept for one release."""

from kvbridge.protocol.decode import DecodeQueue, DecodeRequest, MetadataToSend
from kvbridge.protocol.outcomes import Aborted, Committed, DecodeStep, LateCause, PrefillStep
from kvbridge.protocol.prefill import PrefillQueue, PrefillRequest
from kvbridge.runtime.collective import SingleRankReducer, TorchMinReducer
from kvbridge.runtime.decode_session import DecodeSession
from kvbridge.runtime.prefill_session import PrefillSession
from kvbridge.runtime.wiring import DecodeMetadata, DecodePeer, PrefillDirectory, PrefillTarget

__all__ = [
    "Aborted",
    "Committed",
    "DecodeMetadata",
    "DecodePeer",
    "DecodeQueue",
    "DecodeRequest",
    "DecodeSession",
    "DecodeStep",
    "LateCause",
    "MetadataToSend",
    "PrefillDirectory",
    "PrefillQueue",
    "PrefillRequest",
    "PrefillSession",
    "PrefillStep",
    "PrefillTarget",
    "SingleRankReducer",
    "TorchMinReducer",
]
