"""NIXL registers and describes each region as the memory it is (on CPU, without a GPU).

The agent is the real ``nixl_agent`` behind a thin recorder: descriptor lists are built by the
real ``get_reg_descs`` / ``get_xfer_descs`` and read back from them (memory type and per-entry
device id). Host memory (DRAM) really registers and moves through UCX. Regions labelled
``cuda:N`` are host buffers here; UCX (rightly) refuses to register host memory as VRAM, so the
recorder keeps those registrations and transfers to itself and copies the bytes with memmove.
One test runs the real agent unwrapped to show that VRAM with its device id reaches UCX.
"""

from __future__ import annotations

import ctypes
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


def _mem(descs: Any) -> str:
    return str(descs.getType().name).removesuffix("_SEG")


def _entries(descs: Any) -> list[tuple[int, int, int]]:
    return [tuple(descs[i][:3]) for i in range(descs.descCount())]


class _Pretend:
    """Handle of a VRAM transfer the recorder performed itself."""


class RecordingAgent:
    """The real NIXL agent, recording registrations and transfers (see the module doc)."""

    real_cls: Any = None

    def __init__(self, name: str, config: Any) -> None:
        self.real = self.real_cls(name, config)
        self.registered: list[tuple[str, list[tuple[int, int, int]]]] = []
        self.transfers: list[tuple[str, list[tuple[int, ...]], str, list[tuple[int, ...]]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def register_memory(self, descs: Any) -> Any:
        self.registered.append((_mem(descs), _entries(descs)))
        return descs if _mem(descs) == "VRAM" else self.real.register_memory(descs)

    def deregister_memory(self, descs: Any) -> None:
        if _mem(descs) != "VRAM":
            self.real.deregister_memory(descs)

    def initialize_xfer(self, op: str, local: Any, remote: Any, agent: str) -> Any:
        self.transfers.append((_mem(local), _entries(local), _mem(remote), _entries(remote)))
        if "VRAM" in (_mem(local), _mem(remote)):
            for (src, n, _), (dst, _, _) in zip(_entries(local), _entries(remote)):
                ctypes.memmove(dst, src, n)  # the "device" buffers are host memory here
            return _Pretend()
        return self.real.initialize_xfer(op, local, remote, agent)

    def transfer(self, handle: Any) -> str:
        return "DONE" if isinstance(handle, _Pretend) else self.real.transfer(handle)

    def check_xfer_state(self, handle: Any) -> str:
        return "DONE" if isinstance(handle, _Pretend) else self.real.check_xfer_state(handle)

    def release_xfer_handle(self, handle: Any) -> None:
        if not isinstance(handle, _Pretend):
            self.real.release_xfer_handle(handle)


@pytest.fixture(scope="module")
def manager_cls() -> Any:
    require_transport("nixl")
    from kvbridge_nixl import manager

    return manager


@pytest.fixture
def recording(manager_cls: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent_cls, config_cls = manager_cls.load_nixl()
    monkeypatch.setattr(RecordingAgent, "real_cls", agent_cls)
    monkeypatch.setattr(manager_cls, "load_nixl", lambda: (RecordingAgent, config_cls))


class Side:
    """One rank's buffers: KV regions on the given devices, one host aux region."""

    def __init__(self, devices: list[str], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.kv = [rng.integers(0, 255, PAGES * PAGE, dtype=np.uint8) for _ in devices]
        self.aux = rng.integers(0, 255, ROWS * ROW, dtype=np.uint8)
        self.kv_regions = tuple(
            MemoryRegion(a.ctypes.data, a.nbytes, PAGE, d) for a, d in zip(self.kv, devices)
        )
        self.aux_regions = (MemoryRegion(self.aux.ctypes.data, self.aux.nbytes, ROW, "cpu"),)


def _manager(manager_cls: Any, role: Role, side: Side) -> Any:
    config = TransferConfig(transport="nixl", transport_options={"backend": "UCX"})
    return manager_cls.NixlManager(config, RankIdentity(role), side.kv_regions, side.aux_regions)


def _send(sender: Any, receiver: Any, descriptors: Descriptors, room: int = 7) -> None:
    sender.senders.construct(room)
    sender.init(sender.senders, room, (receiver.endpoint,))
    sender.send(room, SendChunk((PeerWrite(0, descriptors),), is_last=True))
    deadline = time.monotonic() + 20
    while (status := sender.poll(sender.senders, np.array([room])).statuses[0]) < KVPoll.Success:
        assert time.monotonic() < deadline, "transfer did not finish"
        time.sleep(0.005)
    assert status == KVPoll.Success, sender.poll(sender.senders, np.array([room])).failures


@pytest.mark.usefixtures("recording")
def test_gpu_kv_registers_as_vram_with_its_device_and_aux_as_dram(manager_cls: Any) -> None:
    side = Side(["cuda:1", "cuda:1"], seed=1)
    m = _manager(manager_cls, Role.PREFILL, side)
    try:
        assert m.agent.registered == [
            ("DRAM", [(side.aux.ctypes.data, side.aux.nbytes, 0)]),
            ("VRAM", [(a.ctypes.data, a.nbytes, 1) for a in side.kv]),
        ]
    finally:
        m.close()


@pytest.mark.usefixtures("recording")
def test_kv_on_two_gpus_and_host_aux_move_with_each_runs_devices(manager_cls: Any) -> None:
    prefill = Side(["cuda:1", "cpu"], seed=2)
    decode = Side(["cuda:0", "cuda:2"], seed=3)
    p = _manager(manager_cls, Role.PREFILL, prefill)
    d = _manager(manager_cls, Role.DECODE, decode)
    try:
        assert [(t, [e[2] for e in es]) for t, es in d.agent.registered] == [
            ("DRAM", [0]),
            ("VRAM", [0, 2]),
        ]
        src, dst = np.array([0, 1, 2, 9]), np.array([4, 5, 6, 1])
        chunk = Descriptors.concat(
            [
                kv_descriptors(prefill.kv_regions, decode.kv_regions, src, dst),
                aux_descriptors(prefill.aux_regions, decode.aux_regions, 1, 3),
            ]
        )
        _send(p, d, chunk)

        kv0 = (prefill.kv[0].ctypes.data, decode.kv[0].ctypes.data)
        kv1 = (prefill.kv[1].ctypes.data, decode.kv[1].ctypes.data)
        aux = (prefill.aux.ctypes.data + ROW, decode.aux.ctypes.data + 3 * ROW)
        assert p.agent.transfers == [
            (  # KV region 0: cuda:1 -> cuda:0, runs [0..2] -> [4..6] and 9 -> 1
                "VRAM",
                [(kv0[0], 3 * PAGE, 1), (kv0[0] + 9 * PAGE, PAGE, 1)],
                "VRAM",
                [(kv0[1] + 4 * PAGE, 3 * PAGE, 0), (kv0[1] + PAGE, PAGE, 0)],
            ),
            (  # KV region 1: host -> cuda:2
                "DRAM",
                [(kv1[0], 3 * PAGE, 0), (kv1[0] + 9 * PAGE, PAGE, 0)],
                "VRAM",
                [(kv1[1] + 4 * PAGE, 3 * PAGE, 2), (kv1[1] + PAGE, PAGE, 2)],
            ),
            ("DRAM", [(aux[0], ROW, 0)], "DRAM", [(aux[1], ROW, 0)]),  # the aux row, last
        ]
        for s, t in zip(prefill.kv, decode.kv):
            pages_s, pages_t = s.reshape(PAGES, PAGE), t.reshape(PAGES, PAGE)
            assert np.array_equal(pages_t[dst], pages_s[src])
        # The host aux row really moved through NIXL/UCX.
        assert np.array_equal(decode.aux[3 * ROW : 4 * ROW], prefill.aux[ROW : 2 * ROW])
    finally:
        p.close()
        d.close()


def test_real_nixl_gets_vram_with_the_regions_device(manager_cls: Any) -> None:
    """Unwrapped agent: UCX receives VRAM on device 1 and, finding host memory, refuses it."""
    side = Side(["cuda:1"], seed=4)
    with pytest.raises(RuntimeError, match=r"as VRAM \(devices \[1\]\).*NIXL_ERR_BACKEND"):
        _manager(manager_cls, Role.PREFILL, side)


def test_gpu_options_are_gone(manager_cls: Any) -> None:
    side = Side(["cpu"], seed=5)
    config = TransferConfig(transport="nixl", transport_options={"mem_type": "VRAM"})
    with pytest.raises(ValueError, match="unknown nixl transport option"):
        manager_cls.NixlManager(
            config, RankIdentity(Role.PREFILL), side.kv_regions, side.aux_regions
        )
