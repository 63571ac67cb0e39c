"""The Fake transport's loopback wire format: one frame per chunk per peer, one reply each.

Frame: header, then ``count`` (dst, length) pairs, then the payload bytes in that order.
Reply: status byte (0 ok, 1 refused) and a UTF-8 message.
"""

from __future__ import annotations

import ctypes
import socket
import struct

import numpy as np

MAGIC = b"KVBF"
VERSION = 1
HEADER = struct.Struct("<4sHHQI")  # magic, version, flags, room, count
REPLY = struct.Struct("<BI")  # status, message length
FLAG_LAST = 1
FLAG_AUX = 2
MAX_RUNS = 1 << 24


class ProtocolError(Exception):
    pass


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError("peer closed the connection")
        view = view[got:]


def recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def memory_at(addr: int, length: int) -> memoryview:
    """A writable view of raw process memory (already validated by the caller)."""
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


def encode_header(room: int, flags: int, dst: np.ndarray, lengths: np.ndarray) -> bytes:
    pairs = np.empty((len(dst), 2), dtype="<i8")
    pairs[:, 0] = dst
    pairs[:, 1] = lengths
    return HEADER.pack(MAGIC, VERSION, flags, room, len(dst)) + pairs.tobytes()


def decode_header(sock: socket.socket) -> tuple[int, int, np.ndarray, np.ndarray]:
    magic, version, flags, room, count = HEADER.unpack(recv_exact(sock, HEADER.size))
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad frame (magic {magic!r}, version {version})")
    if count > MAX_RUNS:
        raise ProtocolError(f"frame announces {count} runs")
    pairs = np.frombuffer(recv_exact(sock, 16 * count), dtype="<i8").reshape(count, 2)
    return room, flags, pairs[:, 0].copy(), pairs[:, 1].copy()


def send_reply(sock: socket.socket, ok: bool, message: str = "") -> None:
    data = message.encode()
    sock.sendall(REPLY.pack(0 if ok else 1, len(data)) + data)


def read_reply(sock: socket.socket) -> tuple[bool, str]:
    status, size = REPLY.unpack(recv_exact(sock, REPLY.size))
    return status == 0, recv_exact(sock, size).decode(errors="replace")
