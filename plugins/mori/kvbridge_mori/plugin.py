"""Hook implementations of the Mori transport. mori.io is resolved when this module loads:
where it is not importable the plugin fails to load with the reason (see io_module)."""

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
from kvbridge_mori.io_module import load_io_module
from kvbridge_mori.manager import MoriManager

IO = load_io_module()
NAME = "mori"


@hookimpl
def kvbridge_transport_info() -> TransportInfo:
    return TransportInfo(
        name=NAME,
        api_version=KVBRIDGE_API_VERSION,
        capabilities={"cross_process", "rejects_unregistered_memory"},
        description=f"AMD Mori IOEngine via {IO.__name__}",
    )


@hookimpl
def kvbridge_manager_create(
    config: TransferConfig,
    rank: RankIdentity,
    kv_regions: tuple[MemoryRegion, ...],
    aux_regions: tuple[MemoryRegion, ...],
) -> object:
    return MoriManager(IO, config, rank, kv_regions, aux_regions)


@hookimpl
def kvbridge_manager_endpoint(manager) -> Endpoint:
    return manager.endpoint


@hookimpl
def kvbridge_manager_close(manager) -> None:
    manager.close()


@hookimpl
def kvbridge_receiver_construct(manager, room: int) -> None:
    manager.receivers.construct(room)


@hookimpl
def kvbridge_receiver_init(manager, room: int, peers: tuple[Endpoint, ...]) -> None:
    manager.init(manager.receivers, room, peers)


@hookimpl
def kvbridge_receiver_send_metadata(
    manager, room: int, kv_indices: np.ndarray, aux_index: int
) -> None:
    manager.receivers.advance(room, KVPoll.Transferring)


@hookimpl
def kvbridge_receiver_poll(manager, rooms: np.ndarray) -> PollResult:
    return manager.poll(manager.receivers, rooms)


@hookimpl
def kvbridge_receiver_abort(manager, room: int, reason: str) -> None:
    manager.receivers.abort(room, reason)


@hookimpl
def kvbridge_receiver_clear(manager, room: int) -> None:
    manager.receivers.clear(room)


@hookimpl
def kvbridge_sender_construct(manager, room: int) -> None:
    manager.senders.construct(room)


@hookimpl
def kvbridge_sender_init(manager, room: int, peers: tuple[Endpoint, ...]) -> None:
    manager.init(manager.senders, room, peers)


@hookimpl
def kvbridge_sender_send(manager, room: int, chunk: SendChunk) -> None:
    manager.send(room, chunk)


@hookimpl
def kvbridge_sender_poll(manager, rooms: np.ndarray) -> PollResult:
    return manager.poll(manager.senders, rooms)


@hookimpl
def kvbridge_sender_abort(manager, room: int, reason: str) -> None:
    manager.senders.abort(room, reason)


@hookimpl
def kvbridge_sender_clear(manager, room: int) -> None:
    manager.senders.clear(room)
