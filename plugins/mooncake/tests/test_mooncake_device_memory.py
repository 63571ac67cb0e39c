"""Mooncake registers each region at its device's location (on CPU, without a GPU).

The engine is the real ``TransferEngine`` (TCP over loopback), subclassed only to record the
calls: it accepts a ``"cuda:N"`` location for memory that is really host memory here, so the
bytes of regions labelled ``cuda:N`` really move through Mooncake.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from kvbridge.config import TransferConfig
from kvbridge.memory import aux_descriptors, kv_descriptors
from kvbridge.status import KVPoll
from kvbridge.testing import require_transport
from kvbridge.types import Descriptors, MemoryRegion, PeerWrite, RankIdentity, Role, SendChunk

PAGE, PAGES, ROW, ROWS = 1024, 16, 32, 4


@pytest.fixture(scope="module")
def manager_cls() -> Any:
    require_transport("mooncake")
    from kvbridge_mooncake import manager

    return manager


@pytest.fixture
def recording(manager_cls: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine_cls = manager_cls.load_engine_class()

    class RecordingEngine(engine_cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.registered: list[tuple[str, list[int], list[int]]] = []
            self.writes: list[tuple[list[int], list[int], list[int]]] = []
            #: write_api "submit": ("submit", dst) and ("landed", batch id), in order.
            self.events: list[tuple[str, int]] = []

        def batch_register_memory(
            self, addrs: list[int], lengths: list[int], location: str = "*"
        ) -> int:
            self.registered.append((location, list(addrs), list(lengths)))
            return int(super().batch_register_memory(addrs, lengths, location))

        def batch_transfer_sync_write(
            self, session: str, src: list[int], dst: list[int], lengths: list[int]
        ) -> int:
            self.writes.append((list(src), list(dst), list(lengths)))
            return int(super().batch_transfer_sync_write(session, src, dst, lengths))

        def transfer_submit_write(self, session: str, src: int, dst: int, length: int) -> int:
            self.events.append(("submit", dst))
            return int(super().transfer_submit_write(session, src, dst, length))

        def transfer_check_status(self, batch: int) -> int:
            status = int(super().transfer_check_status(batch))
            if status == 1:
                self.events.append(("landed", batch))
            return status

    monkeypatch.setattr(manager_cls, "load_engine_class", lambda: RecordingEngine)


class Side:
    def __init__(self, devices: list[str], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.kv = [rng.integers(0, 255, PAGES * PAGE, dtype=np.uint8) for _ in devices]
        self.aux = rng.integers(0, 255, ROWS * ROW, dtype=np.uint8)
        self.kv_regions = tuple(
            MemoryRegion(a.ctypes.data, a.nbytes, PAGE, d) for a, d in zip(self.kv, devices)
        )
        self.aux_regions = (MemoryRegion(self.aux.ctypes.data, self.aux.nbytes, ROW, "cpu"),)


def _manager(manager_cls: Any, role: Role, side: Side, api: str = "submit") -> Any:
    config = TransferConfig(transport="mooncake", transport_options={"write_api": api})
    return manager_cls.MooncakeManager(
        config, RankIdentity(role), side.kv_regions, side.aux_regions
    )


@pytest.mark.usefixtures("recording")
@pytest.mark.parametrize("api", ["submit", "sync"])
def test_each_region_registers_at_its_devices_location(manager_cls: Any, api: str) -> None:
    prefill = Side(["cuda:1", "cuda:1", "cpu"], seed=1)
    decode = Side(["cuda:0", "cuda:2", "cuda:0"], seed=2)
    p = _manager(manager_cls, Role.PREFILL, prefill, api)
    d = _manager(manager_cls, Role.DECODE, decode)
    try:
        kv = [a.ctypes.data for a in prefill.kv]
        size = PAGES * PAGE
        assert p.engine.registered == [
            ("cuda:1", kv[:2], [size, size]),
            ("*", [kv[2], prefill.aux.ctypes.data], [size, ROWS * ROW]),
        ]
        kv = [a.ctypes.data for a in decode.kv]
        assert d.engine.registered == [
            ("cuda:0", [kv[0], kv[2]], [size, size]),
            ("cuda:2", [kv[1]], [size]),
            ("*", [decode.aux.ctypes.data], [ROWS * ROW]),
        ]

        # GPU KV with a host aux row, through the real engine: every byte lands.
        src, dst = np.array([0, 1, 2, 9]), np.array([4, 5, 6, 1])
        chunk = Descriptors.concat(
            [
                kv_descriptors(prefill.kv_regions, decode.kv_regions, src, dst),
                aux_descriptors(prefill.aux_regions, decode.aux_regions, 1, 3),
            ]
        )
        room = 7
        p.senders.construct(room)
        p.init(p.senders, room, (d.endpoint,))
        p.send(room, SendChunk((PeerWrite(0, chunk),), is_last=True))
        deadline = time.monotonic() + 20
        while p.poll(p.senders, np.array([room])).statuses[0] < KVPoll.Success:
            assert time.monotonic() < deadline, "transfer did not finish"
            time.sleep(0.005)
        assert p.poll(p.senders, np.array([room])).statuses[0] == KVPoll.Success
        for s, t in zip(prefill.kv, decode.kv):
            assert np.array_equal(t.reshape(PAGES, PAGE)[dst], s.reshape(PAGES, PAGE)[src])
        assert np.array_equal(decode.aux[3 * ROW : 4 * ROW], prefill.aux[ROW : 2 * ROW])
        # KV first (no location needed), then the aux row once every page landed.
        aux_dst = decode.aux.ctypes.data + 3 * ROW
        if api == "sync":
            assert [len(w[0]) for w in p.engine.writes] == [6, 1]
            assert p.engine.writes[1][1] == [aux_dst]
        else:
            assert p.engine.writes == []
            kinds = [kind for kind, _ in p.engine.events]
            assert kinds == ["submit"] * 6 + ["landed"] * 6 + ["submit", "landed"]
            assert p.engine.events[12] == ("submit", aux_dst)
    finally:
        p.close()
        d.close()


def test_location_names(manager_cls: Any) -> None:
    assert manager_cls.mooncake_location(MemoryRegion(4096, 4096, 1024, "cuda:3")) == "cuda:3"
    assert manager_cls.mooncake_location(MemoryRegion(4096, 4096, 1024, "cpu")) == "*"
