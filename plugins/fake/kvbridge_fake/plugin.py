"""Hook implementations of the Fake transport: thin adapters onto :class:`FakeManager`.

This module is the template for third-party transports: one ``@hookimpl`` per operation hook,
each doing nothing but translate to the transport's own state object.
"""

from __future__ import annotations

import numpy as np

from kvbridge import KVBRIDGE_API_VERSION, hookimpl
from kvbridge.config import TransferConfig
from kvbridge.status import KVPoll
from kvbridge.types import (
    Endpoint,
    MemoryRegion,
    PollResult,
    RankIdentity,
    SendChunk,
    TransportInfo,
)
from kvbridge_fake.manager import FakeManager

NAME = "fake"
CAPABILITIES = frozenset({"cross_process", "fault_injection", "rejects_unregistered_memory"})


@hookimpl
def kvbridge_transport_info() -> TransportInfo:
    return TransportInfo(
        name=NAME,
        api_version=KVBRIDGE_API_VERSION,
        capabilities=CAPABILITIES,
        description="CPU transport over memmove and loopback TCP, with fault injection",
    )


@hookimpl
def kvbridge_manager_create(
    config: TransferConfig,
    rank: RankIdentity,
    kv_regions: tuple[MemoryRegion, ...],
    aux_regions: tuple[MemoryRegion, ...],
) -> FakeManager:
    return FakeManager(config, rank, kv_regions, aux_regions)


@hookimpl
def kvbridge_manager_endpoint(manager: FakeManager) -> Endpoint:
    return manager.endpoint


@hookimpl
def kvbridge_manager_close(manager: FakeManager) -> None:
    manager.close()


@hookimpl
def kvbridge_receiver_construct(manager: FakeManager, room: int) -> None:
    manager.receivers.construct(room)


@hookimpl
def kvbridge_receiver_init(manager: FakeManager, room: int, peers: tuple[Endpoint, ...]) -> None:
    manager.init(manager.receivers, room, peers)


@hookimpl
def kvbridge_receiver_send_metadata(
    manager: FakeManager, room: int, kv_indices: np.ndarray, aux_index: int
) -> None:
    manager.receivers.advance(room, KVPoll.Transferring)


@hookimpl
def kvbridge_receiver_poll(manager: FakeManager, rooms: np.ndarray) -> PollResult:
    return manager.poll(manager.receivers, rooms)


@hookimpl
def kvbridge_receiver_abort(manager: FakeManager, room: int, reason: str) -> None:
    manager.receivers.abort(room, reason)


@hookimpl
def kvbridge_receiver_clear(manager: FakeManager, room: int) -> None:
    manager.receivers.clear(room)


@hookimpl
def kvbridge_sender_construct(manager: FakeManager, room: int) -> None:
    manager.senders.construct(room)


@hookimpl
def kvbridge_sender_init(manager: FakeManager, room: int, peers: tuple[Endpoint, ...]) -> None:
    manager.init(manager.senders, room, peers)


@hookimpl
def kvbridge_sender_send(manager: FakeManager, room: int, chunk: SendChunk) -> None:
    manager.send(room, chunk)


@hookimpl
def kvbridge_sender_poll(manager: FakeManager, rooms: np.ndarray) -> PollResult:
    return manager.poll(manager.senders, rooms)


@hookimpl
def kvbridge_sender_abort(manager: FakeManager, room: int, reason: str) -> None:
    manager.senders.abort(room, reason)


@hookimpl
def kvbridge_sender_clear(manager: FakeManager, room: int) -> None:
    manager.senders.clear(room)
