"""Lanes: a kit-based transport whose writes block may write several rooms to one peer at once.

With ``lanes_per_peer`` above 1 rooms spread over that many worker threads per peer (by room
number): a write that blocks for one room no longer holds up another room's. Each room's own
chunks still run in order on one lane, its aux runs after its KV runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from kvbridge_mooncake.manager import MooncakeManager

from kvbridge import MemoryRegion, RankIdentity, Role, TransferConfig
from kvbridge.memory import aux_descriptors, kv_descriptors
from kvbridge.status import KVPoll
from kvbridge.transport.kit import BookedManager
from kvbridge.types import Descriptors, PeerWrite, SendChunk

PAGE, PAGES, ROW = 64, 32, 32
KV = (MemoryRegion(0x100000, PAGE * PAGES, PAGE),)
AUX = (MemoryRegion(0x200000, ROW * 8, ROW),)
PEER_KV = (MemoryRegion(0x900000, PAGE * PAGES, PAGE),)
PEER_AUX = (MemoryRegion(0xA00000, ROW * 8, ROW),)


class BlockingManager(BookedManager):
    """Records every write; a write of a room in ``held`` blocks until released."""

    def __init__(self, lanes: int) -> None:
        super().__init__("lanes-test", KV, AUX)
        self.lanes = lanes
        self.held: dict[int, threading.Event] = {}
        self.started: dict[int, threading.Event] = {}
        self.log: list[tuple[int, bool, int]] = []
        self.lock = threading.Lock()

    def peer_key(self, peer: Mapping[str, Any]) -> str:
        return str(peer["name"])

    def lanes_per_peer(self) -> int:
        return self.lanes

    def write(self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool) -> None:
        self.started.setdefault(room, threading.Event()).set()
        gate = self.held.get(room)
        if gate is not None:
            gate.wait(30)
        with self.lock:
            self.log.append((room, is_aux, int(runs.dst[0])))


def _open(manager: BlockingManager, room: int) -> None:
    manager.senders.construct(room)
    manager.init(manager.senders, room, ({"name": "decode-0"},))


def _chunk(pages: list[int], *, last: bool, slot: int = 0) -> SendChunk:
    src = np.array(pages, dtype=np.int64)
    parts = [kv_descriptors(KV, PEER_KV, src, src)]
    if last:
        parts.append(aux_descriptors(AUX, PEER_AUX, slot, slot))
    return SendChunk((PeerWrite(0, Descriptors.concat(parts)),), last)


def _status(manager: BlockingManager, room: int) -> int:
    return int(manager.poll(manager.senders, np.array([room], dtype=np.uint64)).statuses[0])


def _until(what: str, done: Any, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_blocked_room_holds_up_another_only_on_the_same_lane(lanes: int) -> None:
    manager = BlockingManager(lanes)
    try:
        blocked, other = 10, 11  # 10 % 2 != 11 % 2: other lanes when there are two
        manager.held[blocked] = threading.Event()
        for room in (blocked, other):
            _open(manager, room)
        manager.send(blocked, _chunk([0, 1], last=True))
        manager.started.setdefault(blocked, threading.Event()).wait(30)
        manager.send(other, _chunk([4, 5], last=True, slot=1))
        if lanes == 1:
            time.sleep(0.2)
            assert _status(manager, other) == KVPoll.Transferring  # behind the blocked write
        else:
            _until("the other room done", lambda: _status(manager, other) == KVPoll.Success)
            assert _status(manager, blocked) == KVPoll.Transferring
        manager.held[blocked].set()
        _until(
            "both done",
            lambda: _status(manager, blocked) == _status(manager, other) == KVPoll.Success,
        )
    finally:
        for gate in manager.held.values():
            gate.set()
        manager.close()


def test_each_rooms_chunks_stay_in_order_with_its_aux_last() -> None:
    manager = BlockingManager(lanes=4)
    try:
        rooms = list(range(1, 13))
        for room in rooms:
            _open(manager, room)
        for first in (0, 2, 4):
            for room in rooms:
                manager.send(room, _chunk([first, first + 1], last=first == 4, slot=room % 8))
        _until("all done", lambda: all(_status(manager, r) == KVPoll.Success for r in rooms))
        for room in rooms:
            mine = [(is_aux, dst) for r, is_aux, dst in manager.log if r == room]
            kv_dsts = [dst for is_aux, dst in mine if not is_aux]
            assert kv_dsts == sorted(kv_dsts) and len(kv_dsts) == 3  # chunk order
            assert mine[-1][0] and not any(is_aux for is_aux, _ in mine[:-1])  # aux last
    finally:
        manager.close()


class RecordingManager(BlockingManager):
    """Records the whole runs of every write."""

    def __init__(self) -> None:
        super().__init__(lanes=1)
        self.runs: list[tuple[bool, list[int]]] = []

    def write(self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool) -> None:
        self.runs.append((is_aux, runs.dst.tolist()))


@pytest.mark.parametrize("order", ["aux-last", "aux-first", "aux-between", "aux-only"])
def test_aux_runs_are_written_after_every_kv_run_wherever_the_chunk_puts_them(
    order: str,
) -> None:
    kv = kv_descriptors(KV, PEER_KV, np.array([0, 2, 4]), np.array([1, 3, 5]))
    aux = aux_descriptors(AUX, PEER_AUX, 1, 2)
    parts = {
        "aux-last": [kv, aux],
        "aux-first": [aux, kv],
        "aux-between": [kv.select(slice(0, 1)), aux, kv.select(slice(1, 3))],
        "aux-only": [aux],
    }[order]
    manager = RecordingManager()
    try:
        _open(manager, 7)
        chunk = SendChunk((PeerWrite(0, Descriptors.concat(parts)),), True)
        manager.send(7, chunk)
        _until("done", lambda: _status(manager, 7) == KVPoll.Success)
        expected = [(True, aux.dst.tolist())]
        if order != "aux-only":
            expected.insert(0, (False, kv.dst.tolist()))
        assert manager.runs == expected
    finally:
        manager.close()


@pytest.mark.parametrize("bad", [0, 65, 2.5, "4", True])
def test_mooncake_refuses_a_nonsensical_lane_count(bad: object) -> None:
    config = TransferConfig(transport="mooncake", transport_options={"lanes_per_peer": bad})
    with pytest.raises(ValueError, match="lanes_per_peer"):
        MooncakeManager(config, RankIdentity(Role.PREFILL), KV, AUX)


def test_an_abort_while_the_pages_are_written_stops_the_aux_row() -> None:
    manager = BlockingManager(lanes=1)
    try:
        room = 7
        manager.held[room] = threading.Event()
        _open(manager, room)
        manager.send(room, _chunk([0, 1, 2], last=True, slot=3))
        manager.started.setdefault(room, threading.Event()).wait(30)
        manager.senders.abort(room, "decode gave up")
        manager.held[room].set()
        rooms = np.array([room], dtype=np.uint64)
        _until("drained", lambda: bool(manager.senders.drained(rooms)[0]))
        assert [(r, is_aux) for r, is_aux, _ in manager.log] == [(room, False)]  # no stamp
        assert _status(manager, room) == KVPoll.Failed
    finally:
        manager.close()
