"""Frames from the network that the Fake's receiver must refuse without landing a byte."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import pytest

from kvbridge.config import TransferConfig
from kvbridge.types import MemoryRegion, RankIdentity, Role
from kvbridge_fake import wire
from kvbridge_fake.manager import FakeManager

ROOM = 5


@pytest.fixture
def receiver() -> Iterator[tuple[FakeManager, np.ndarray]]:
    kv = np.zeros(4 * 1024, dtype=np.uint8)
    aux = np.zeros(64, dtype=np.uint8)
    manager = FakeManager(
        TransferConfig(transport="fake"),
        RankIdentity(Role.DECODE),
        (MemoryRegion.of(kv, 1024),),
        (MemoryRegion.of(aux, 64),),
    )
    manager.receivers.construct(ROOM)  # a room that accepts writes
    try:
        yield manager, kv
    finally:
        manager.close()


def frame(dst: list[int], lengths: list[int]) -> bytes:
    return wire.encode_header(ROOM, 0, np.array(dst), np.array(lengths))


def connect(manager: FakeManager) -> socket.socket:
    sock = socket.create_connection((manager.host, manager.port), timeout=10)
    sock.settimeout(10)
    return sock


def hung_up(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our unread payload in its buffer
        return True


@pytest.mark.parametrize("runs", [1, 17], ids=["few-runs", "many-runs"])
def test_a_length_whose_end_overflows_is_refused_and_the_connection_closed(
    receiver: tuple[FakeManager, np.ndarray], runs: int
) -> None:
    manager, kv = receiver
    addr = kv.ctypes.data
    wraps = 2**63 - addr + 8  # addr + length wraps past int64 to just above addr
    with connect(manager) as sock:
        sock.sendall(frame([addr] * runs, [wraps] * runs) + b"\x01" * 64)
        ok, message = wire.read_reply(sock)
        assert not ok
        assert "is not in memory registered" in message
        assert hung_up(sock)  # no payload size to skip: the server closed the connection
    assert not kv.any()
    # The receiver still serves: a good frame on a new connection lands.
    with connect(manager) as sock:
        sock.sendall(frame([addr], [4]) + b"\x07" * 4)
        assert wire.read_reply(sock) == (True, "")
    assert kv[:4].tolist() == [7] * 4 and not kv[4:].any()


def test_a_refused_frame_with_a_sane_payload_is_skipped_and_the_connection_kept(
    receiver: tuple[FakeManager, np.ndarray],
) -> None:
    manager, kv = receiver
    addr = kv.ctypes.data
    with connect(manager) as sock:
        # Runs past the end of the region: refused, its 8 payload bytes skipped.
        sock.sendall(frame([addr + len(kv) - 4], [8]) + b"\x09" * 8)
        ok, message = wire.read_reply(sock)
        assert not ok and "is not in memory registered" in message
        sock.sendall(frame([addr], [2]) + b"\x03" * 2)
        assert wire.read_reply(sock) == (True, "")
    assert kv[:2].tolist() == [3, 3] and not kv[2:].any()
