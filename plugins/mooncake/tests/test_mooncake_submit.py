"""The submit path (``write_api`` "submit") against the real engine where it can hurt: a peer
the engine cannot reach, options that make no sense, and a rank's cap on writes in flight."""

from __future__ import annotations

import time

import numpy as np
import pytest
from kvbridge_mooncake.manager import MooncakeManager

from kvbridge import MemoryRegion, RankIdentity, Role, TransferConfig
from kvbridge.memory import aux_descriptors, kv_descriptors
from kvbridge.status import KVPoll
from kvbridge.types import Descriptors, PeerWrite, SendChunk

PAGE, PAGES, ROWS = 4096, 8, 4


def _manager(options: dict[str, object], kv: np.ndarray, aux: np.ndarray) -> MooncakeManager:
    config = TransferConfig(transport="mooncake", transport_options={"protocol": "tcp", **options})
    return MooncakeManager(config, RankIdentity(Role.PREFILL), *_regions(kv, aux))


def _regions(
    kv: np.ndarray, aux: np.ndarray
) -> tuple[tuple[MemoryRegion, ...], tuple[MemoryRegion, ...]]:
    return (MemoryRegion.of(kv, PAGE),), (MemoryRegion.of(aux, aux.shape[1]),)


def _wait_status(manager: MooncakeManager, room: int, limit: float = 30.0) -> tuple[int, str]:
    rooms = np.array([room], dtype=np.uint64)
    deadline = time.monotonic() + limit
    while True:
        result = manager.poll(manager.senders, rooms)
        status = int(result.statuses[0])
        if status in (KVPoll.Success, KVPoll.Failed):
            return status, result.failures.get(room, "")
        assert time.monotonic() < deadline, f"room {room} still {status} after {limit}s"
        time.sleep(0.005)


def test_a_peer_the_engine_cannot_reach_fails_the_room_and_the_process_lives() -> None:
    # The engine answers a submit to an unreachable session with id 0, and checking id 0
    # crashes the process: the room must fail with a reason instead (after its retries).
    kv = np.zeros((PAGES, PAGE), dtype=np.uint8)
    aux = np.zeros((ROWS, 64), dtype=np.uint8)
    manager = _manager({"retries": 1}, kv, aux)
    try:
        peer_kv = (MemoryRegion(0x7F0000000000, PAGE * PAGES, PAGE),)
        peer_aux = (MemoryRegion(0x7F0001000000, 64 * ROWS, 64),)
        room = 5
        manager.senders.construct(room)
        manager.init(manager.senders, room, ({"session": "127.0.0.1:1"},))
        pages = np.arange(3, dtype=np.int64)
        d = Descriptors.concat(
            [
                kv_descriptors(_regions(kv, aux)[0], peer_kv, pages, pages),
                aux_descriptors(_regions(kv, aux)[1], peer_aux, 1, 1),
            ]
        )
        manager.send(room, SendChunk((PeerWrite(0, d),), True))
        status, reason = _wait_status(manager, room)
        assert status == KVPoll.Failed
        assert "room 5" in reason and "127.0.0.1:1" in reason and "2 tries" in reason
        assert manager._in_flight == 0  # nothing left counted against max_in_flight
    finally:
        manager.close()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"write_api": "rdma"}, "write_api"),
        ({"write_api": "submit", "lanes_per_peer": 2}, "lanes_per_peer applies"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": 5000}, "max_in_flight"),
        ({"writes_in_flight": True}, "writes_in_flight"),
        ({"writes_in_flight": 0}, "writes_in_flight"),
    ],
)
def test_options_that_make_no_sense_are_refused_by_name(
    options: dict[str, object], named: str
) -> None:
    kv = np.zeros((PAGES, PAGE), dtype=np.uint8)
    aux = np.zeros((ROWS, 64), dtype=np.uint8)
    with pytest.raises(ValueError, match=named):
        _manager(options, kv, aux)
