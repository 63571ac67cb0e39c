"""Mori registers each region with its device id and location, and every ``batch_write`` names
both sides' memory through descriptors that carry them (on CPU, through the stand-in).

``standin.GPU_AS_HOST`` lets the stand-in accept GPU registrations of what is really host
memory, recording device id and location in the MemoryDesc, so bytes still move.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from kvbridge_mori import standin
from kvbridge_mori.manager import MoriManager

from kvbridge.config import TransferConfig
from kvbridge.memory import aux_descriptors, kv_descriptors
from kvbridge.status import KVPoll
from kvbridge.types import Descriptors, MemoryRegion, PeerWrite, RankIdentity, Role, SendChunk

PAGE, PAGES, ROW, ROWS = 1024, 16, 32, 4


@pytest.fixture
def io(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(standin, "GPU_AS_HOST", True)
    return standin


class Side:
    def __init__(self, devices: list[str], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.kv = [rng.integers(0, 255, PAGES * PAGE, dtype=np.uint8) for _ in devices]
        self.aux = rng.integers(0, 255, ROWS * ROW, dtype=np.uint8)
        self.kv_regions = tuple(
            MemoryRegion(a.ctypes.data, a.nbytes, PAGE, d) for a, d in zip(self.kv, devices)
        )
        self.aux_regions = (MemoryRegion(self.aux.ctypes.data, self.aux.nbytes, ROW, "cpu"),)


def _manager(io: Any, role: Role, side: Side) -> MoriManager:
    config = TransferConfig(transport="mori", transport_options={"backend": "TCP"})
    return MoriManager(io, config, RankIdentity(role), side.kv_regions, side.aux_regions)


def _registered(m: MoriManager) -> list[tuple[int, int, str]]:
    return sorted((d.data, d.device_id, d.loc) for d in m.engine._memory.values())


def test_regions_register_with_device_id_and_location(io: Any) -> None:
    prefill = Side(["cuda:1", "cuda:1"], seed=1)
    decode = Side(["cuda:0", "cuda:2"], seed=2)
    p, d = _manager(io, Role.PREFILL, prefill), _manager(io, Role.DECODE, decode)
    try:
        assert _registered(p) == sorted(
            [(a.ctypes.data, 1, "GPU") for a in prefill.kv] + [(prefill.aux.ctypes.data, -1, "CPU")]
        )
        assert _registered(d) == sorted(
            [
                (decode.kv[0].ctypes.data, 0, "GPU"),
                (decode.kv[1].ctypes.data, 2, "GPU"),
                (decode.aux.ctypes.data, -1, "CPU"),
            ]
        )

        writes: list[tuple[int, str, int, str, int]] = []
        batch_write = p.engine.batch_write

        def recording(local: Any, lo: Any, remote: Any, ro: Any, sizes: Any, uid: int) -> Any:
            writes.append((local.device_id, local.loc, remote.device_id, remote.loc, len(sizes)))
            return batch_write(local, lo, remote, ro, sizes, uid)

        p.engine.batch_write = recording  # type: ignore[method-assign]

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
        result = p.poll(p.senders, np.array([room]))
        assert result.statuses[0] == KVPoll.Success, result.failures

        # The peer's MemoryDescs (from its endpoint) name its devices; KV first, aux last.
        kv_writes, aux_write = sorted(writes[:-1]), writes[-1]
        assert kv_writes == [(1, "GPU", 0, "GPU", 2), (1, "GPU", 2, "GPU", 2)]
        assert aux_write == (-1, "CPU", -1, "CPU", 1)
        for s, t in zip(prefill.kv, decode.kv):
            assert np.array_equal(t.reshape(PAGES, PAGE)[dst], s.reshape(PAGES, PAGE)[src])
        assert np.array_equal(decode.aux[3 * ROW : 4 * ROW], prefill.aux[ROW : 2 * ROW])
    finally:
        engines = (p.engine, d.engine)
        p.close()
        d.close()
        for engine in engines:
            engine.shutdown()


def test_standin_without_a_gpu_refuses_gpu_memory() -> None:
    side = Side(["cuda:1"], seed=3)
    with pytest.raises(RuntimeError, match="no GPU on this host"):
        _manager(standin, Role.PREFILL, side)
