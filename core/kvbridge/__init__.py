"""kvbridge: hand KV caches from prefill to decode over pluggable transports."""

from kvbridge._version import __version__
from kvbridge.config import TransferConfig
from kvbridge.errors import (
    ConfigError,
    IncompatiblePluginError,
    KVBridgeError,
    KVTransferError,
    PluginLoadError,
    TransportNotFoundError,
)
from kvbridge.memory import AuxLayout, AuxSlotPool, PagePool
from kvbridge.protocol.decode import DecodeRequest
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.runtime.collective import SingleRankReducer, TorchMinReducer
from kvbridge.runtime.decode_node import DecodeNode
from kvbridge.runtime.prefill_node import PrefillNode
from kvbridge.secret import Secret
from kvbridge.status import KVPoll
from kvbridge.transport.facade import Transport, TransportManager
from kvbridge.transport.hookspecs import KVBRIDGE_API_VERSION, hookimpl
from kvbridge.transport.loading import TransportRegistry
from kvbridge.types import (
    Capability,
    Descriptors,
    MemoryRegion,
    PeerWrite,
    PollResult,
    RankIdentity,
    Role,
    SendChunk,
    TransportInfo,
)

__all__ = [
    "KVBRIDGE_API_VERSION",
    "AuxLayout",
    "AuxSlotPool",
    "Capability",
    "ConfigError",
    "DecodeNode",
    "DecodeRequest",
    "Descriptors",
    "IncompatiblePluginError",
    "KVBridgeError",
    "KVPoll",
    "KVTransferError",
    "MemoryRegion",
    "PagePool",
    "PeerWrite",
    "PluginLoadError",
    "PollResult",
    "PrefillNode",
    "PrefillRequest",
    "RankIdentity",
    "Role",
    "Secret",
    "SendChunk",
    "SingleRankReducer",
    "TorchMinReducer",
    "TransferConfig",
    "Transport",
    "TransportInfo",
    "TransportManager",
    "TransportNotFoundError",
    "TransportRegistry",
    "__version__",
    "hookimpl",
]
