"""The stand-in fails the way mori.io does; these pin its behaviour to the documented API."""

from __future__ import annotations

import time

import numpy as np
import pytest
from kvbridge_mori import standin as io


def engine(key: str) -> io.IOEngine:
    e = io.IOEngine(key, io.IOEngineConfig(host="127.0.0.1", port=0))
    e.create_backend(io.BackendType.RDMA)
    return e


def wait(status: io.TransferStatus) -> io.TransferStatus:
    deadline = time.monotonic() + 10
    while status.InProgress():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return status


def test_descs_pack_and_unpack() -> None:
    e = engine("a")
    desc = e.get_engine_desc()
    assert io.EngineDesc.unpack(desc.pack()) == desc
    buf = np.zeros(64, dtype=np.uint8)
    mem = e.register_memory(buf.ctypes.data, 64, -1, io.MemoryLocationType.CPU)
    assert io.MemoryDesc.unpack(mem.pack()) == mem


def test_bad_registration_raises() -> None:
    e = engine("b")
    with pytest.raises(RuntimeError, match="invalid buffer"):
        e.register_memory(0, 64, -1, io.MemoryLocationType.CPU)
    buf = np.zeros(64, dtype=np.uint8)
    e.register_memory(buf.ctypes.data, 64, -1, io.MemoryLocationType.CPU)
    with pytest.raises(RuntimeError, match="overlaps"):
        e.register_memory(buf.ctypes.data + 8, 8, -1, io.MemoryLocationType.CPU)
    with pytest.raises(NotImplementedError):
        e.create_backend(io.BackendType.XGMI)


def test_batch_write_moves_bytes_and_reports_errors() -> None:
    a, b = engine("c"), engine("d")
    src = np.arange(256, dtype=np.uint8)
    dst = np.zeros(256, dtype=np.uint8)
    ma = a.register_memory(src.ctypes.data, 256, -1, io.MemoryLocationType.CPU)
    mb = b.register_memory(dst.ctypes.data, 256, -1, io.MemoryLocationType.CPU)
    unknown = a.batch_write(ma, [0], mb, [0], [8], a.allocate_transfer_uid())
    assert unknown.Failed() and unknown.Code() == io.StatusCode.ERR_NOT_FOUND
    a.register_remote_engine(b.get_engine_desc())
    ok = wait(a.batch_write(ma, [0, 16], mb, [100, 200], [8, 8], a.allocate_transfer_uid()))
    assert ok.Succeeded()
    assert dst[100:108].tolist() == list(range(8)) and dst[200:208].tolist() == list(range(16, 24))
    out = a.batch_write(ma, [0], mb, [250], [8], a.allocate_transfer_uid())
    assert out.Failed() and out.Code() == io.StatusCode.ERR_INVALID_ARGS
    b.shutdown()
    gone = wait(a.batch_write(ma, [0], mb, [0], [8], a.allocate_transfer_uid()))
    assert gone.Failed() and gone.Code() == io.StatusCode.ERR_RDMA_OP
