"""Gated collective queues: keep every rank of a group in lock-step, request by request."""

from kvbridge.protocol.decode import DecodeQueue, DecodeRequest, MetadataToSend
from kvbridge.protocol.outcomes import Aborted, Committed, DecodeStep, LateCause, PrefillStep
from kvbridge.protocol.prefill import PrefillQueue, PrefillRequest
from kvbridge.queue.collective import SingleRankReducer, TorchMinReducer
from kvbridge.queue.session import (
    DecodeMetadata,
    DecodePeer,
    DecodeSession,
    PrefillDirectory,
    PrefillSession,
    PrefillTarget,
)

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
