"""The frame format the mori.io stand-in (:mod:`kvbridge_mori.standin`) uses between engines.

One request per ``batch_write``, one reply per request, on a loopback TCP stream:

- request: ``REQUEST`` (magic, version, run count, transfer uid, total payload bytes), then one
  little-endian ``(address, length)`` int64 pair per run, then the runs' bytes in that order;
- reply: ``REPLY`` (status: 0 ok, 1 refused; message length), then the UTF-8 message.

Addresses are raw addresses in the listening engine's process, which writes only into memory
registered there. Only stand-in engines speak this format; it is not mori.io's wire protocol.
"""

from __future__ import annotations

import ctypes
import socket
import struct

import numpy as np

MAGIC = b"MOSI"
VERSION = 1
REQUEST = struct.Struct("<4sHxxIQQ")  # magic, version, run count, transfer uid, payload bytes
REPLY = struct.Struct("<BI")  # status, message length
RUN = np.dtype("<i8")
#: The most runs a request may announce (a corrupt header must not allocate without bound).
MAX_RUNS = 1 << 24
#: Payload of a refused request is read and dropped in pieces of this size.
_DRAIN = 1 << 20


class ProtocolError(Exception):
    """The peer sent something that is not a stand-in request or reply."""


def raw_memory(addr: int, length: int) -> memoryview:
    """A writable byte view of ``length`` bytes at ``addr`` (the caller checked the range)."""
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ConnectionError if the peer closes first."""
    while view.nbytes:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("peer closed the connection")
        view = view[n:]


def _recv(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    recv_into(sock, memoryview(buf))
    return bytes(buf)


def drain(sock: socket.socket, size: int) -> None:
    """Read and drop ``size`` bytes."""
    buf = memoryview(bytearray(min(size, _DRAIN)))
    while size:
        piece = min(size, len(buf))
        recv_into(sock, buf[:piece])
        size -= piece


def pack_request(uid: int, addrs: np.ndarray, lengths: np.ndarray) -> bytes:
    """Header and run table of a request; the caller sends the runs' bytes after it."""
    runs = np.empty((len(addrs), 2), dtype=RUN)
    runs[:, 0] = addrs
    runs[:, 1] = lengths
    total = int(runs[:, 1].sum())
    return REQUEST.pack(MAGIC, VERSION, len(runs), uid, total) + runs.tobytes()


def read_request(sock: socket.socket) -> tuple[int, np.ndarray, np.ndarray]:
    """Read a request's header and run table: ``(uid, addresses, lengths)``.

    The runs' bytes (``lengths.sum()`` of them) follow on the stream, to be read by the caller.
    """
    magic, version, count, uid, total = REQUEST.unpack(_recv(sock, REQUEST.size))
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a stand-in request (magic {magic!r}, version {version})")
    if count > MAX_RUNS:
        raise ProtocolError(f"request announces {count} runs (at most {MAX_RUNS})")
    runs = np.frombuffer(_recv(sock, count * 2 * RUN.itemsize), dtype=RUN).reshape(count, 2)
    addrs, lengths = runs[:, 0].copy(), runs[:, 1].copy()
    if (lengths < 0).any() or int(lengths.sum()) != total:
        raise ProtocolError("request run lengths are negative or do not add up")
    return uid, addrs, lengths


def send_reply(sock: socket.socket, ok: bool, message: str = "") -> None:
    data = message.encode()
    sock.sendall(REPLY.pack(0 if ok else 1, len(data)) + data)


def recv_reply(sock: socket.socket) -> tuple[bool, str]:
    """``(ok, message)`` of the reply to the last request sent on ``sock``."""
    status, size = REPLY.unpack(_recv(sock, REPLY.size))
    return status == 0, _recv(sock, size).decode(errors="replace")
