"""The Fake transport's per-rank state: registered regions, a loopback listener that lands
incoming writes, and a worker thread that performs outgoing writes off the scheduler thread.

Writes to a manager in the same process are a bounds-checked memmove; writes to another
process go over a loopback TCP connection to that manager's listener, which reads the payload
straight into the registered memory. A socket (rather than shared memory) lets the Fake work
with any engine-allocated buffer, and makes a dead peer look like it does on real networks:
a refused or reset connection.

Device memory: the Fake moves host memory only (memmove and sockets cannot touch GPU memory),
so a region on ``cuda:N`` is refused at creation with :class:`MemoryRegistrationError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from kvbridge.config import TransferConfig
from kvbridge.errors import MemoryRegistrationError
from kvbridge.status import KVPoll
from kvbridge.transport.kit import BookedManager, transport_options
from kvbridge.types import Descriptors, MemoryRegion, RankIdentity
from kvbridge_fake import wire
from kvbridge_fake.faults import FaultPlan

log = logging.getLogger("kvbridge.fake")

_LOCAL_MANAGERS: dict[str, FakeManager] = {}
_LOCAL_LOCK = threading.Lock()
#: A refused frame's payload is read and dropped up to this size, else the connection closes.
_MAX_DRAIN = 1 << 36
_DRAIN_CHUNK = 1 << 20
#: ``host`` None: bind ``config.bind_host`` and advertise ``config.advertised_host``.
OPTIONS: dict[str, Any] = {"faults": {}, "host": None, "io_timeout": 30.0}


class FakeManager(BookedManager):
    def __init__(
        self,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: tuple[MemoryRegion, ...],
        aux_regions: tuple[MemoryRegion, ...],
    ) -> None:
        options = config.transport_options
        options = transport_options("fake", options, OPTIONS)
        for region in (*kv_regions, *aux_regions):
            if region.is_gpu:
                raise MemoryRegistrationError(
                    f"the fake transport moves host memory only; region at {region.addr:#x} "
                    f"is on {region.device} (use mooncake, nixl or mori for GPU memory)"
                )
        self.faults = FaultPlan.from_options(options)
        self.rank = rank
        self.tp_rank = rank.tp_rank
        self.io_timeout = float(options.get("io_timeout", 30.0))
        self.id = uuid.uuid4().hex
        self._connections: dict[str, socket.socket] = {}
        self._stopping = threading.Event()

        host = options.get("host")
        self._listener = socket.create_server((host or config.bind_host, 0))
        self.port = self._listener.getsockname()[1]
        self.host = host or config.advertised_host
        super().__init__(f"{rank.label}@{self.host}:{self.port}", kv_regions, aux_regions)
        self._threads = [
            threading.Thread(
                target=self._accept_loop, name=f"kvbridge-fake-accept-{self.port}", daemon=True
            ),
        ]
        for t in self._threads:
            t.start()
        with _LOCAL_LOCK:
            _LOCAL_MANAGERS[self.id] = self

    @property
    def endpoint(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "port": self.port, "pid": os.getpid()}

    def release(self) -> None:
        self._stopping.set()
        with _LOCAL_LOCK:
            _LOCAL_MANAGERS.pop(self.id, None)
        with contextlib.suppress(OSError):
            # shutdown() wakes the thread blocked in accept(); close() alone does not.
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in list(self._connections.values()):
            conn.close()
        self._connections.clear()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    # -- what BookedManager asks of a transport --------------------------------------------------

    def check_peer(self, peer: Mapping[str, Any]) -> None:
        if not {"id", "host", "port", "pid"} <= set(peer):
            raise ValueError(f"not a fake transport endpoint: {peer!r}")

    def peer_key(self, peer: Mapping[str, Any]) -> str:
        return str(peer["id"])

    def init_delay(self) -> float:
        return self.faults.delay_for("init", self.tp_rank)

    def send_delay(self) -> float:
        return self.faults.delay_for("send", self.tp_rank)

    def injected_failure(self, room: int) -> str | None:
        if self.faults.fail_rooms and self.faults.fails(room, self.tp_rank):
            return "injected failure (fake transport fault plan)"
        return None

    def injects_failures(self) -> bool:
        return bool(self.faults.fail_rooms)

    def write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> str | None:
        flags = wire.FLAG_AUX if is_aux else 0
        target = _LOCAL_MANAGERS.get(peer["id"]) if peer["pid"] == os.getpid() else None
        if target is not None:
            sources = iter(runs.src.tolist())

            def copy_next(addr: int, n: int) -> None:
                ctypes.memmove(addr, next(sources), n)

            return target.land(room, flags, runs.dst, runs.lengths, copy_next)
        if peer["pid"] == os.getpid():
            return f"peer {peer['host']}:{peer['port']} is gone (closed)"
        self._deliver_remote(peer, room, flags, runs.src, runs.dst, runs.lengths)
        return None

    def _deliver_remote(
        self,
        peer: Mapping[str, Any],
        room: int,
        flags: int,
        src: np.ndarray,
        dst: np.ndarray,
        lengths: np.ndarray,
    ) -> None:
        where = f"{peer['host']}:{peer['port']}"
        conn = self._connections.get(peer["id"])
        try:
            if conn is None:
                conn = socket.create_connection(
                    (peer["host"], peer["port"]), timeout=self.io_timeout
                )
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._connections[peer["id"]] = conn
            conn.sendall(wire.encode_header(room, flags, dst, lengths))
            for addr, n in zip(src.tolist(), lengths.tolist()):
                conn.sendall(wire.memory_at(addr, n))
            ok, message = wire.read_reply(conn)
        except OSError as exc:
            self._connections.pop(peer["id"], None)
            if conn is not None:
                conn.close()
            raise ConnectionError(f"peer {where} is gone: {exc}") from exc
        if not ok:
            raise RuntimeError(f"peer {where} refused the write: {message}")

    # -- landing incoming writes ---------------------------------------------------------------

    def land(
        self,
        room: int,
        flags: int,
        dst: np.ndarray,
        lengths: np.ndarray,
        read_into: Callable[[int, int], object],
    ) -> str | None:
        """Land one frame's runs; ``read_into(addr, n)`` fills n bytes at addr. Returns an error."""
        if self.tp_rank in self.faults.gone_ranks:
            raise ConnectionError(f"peer {self.host}:{self.port} is gone (fault plan)")
        if not self.receivers.accepting(room):
            return f"room {room} is not expecting data on {self.label}"
        i = self.regions.first_uncovered(dst, lengths)
        if i is not None:
            return (
                f"destination [{int(dst[i]):#x}, +{int(lengths[i])}) is not in memory "
                f"registered on {self.label}"
            )
        delay = self.faults.aux_delay_on(self.tp_rank) if flags & wire.FLAG_AUX else 0.0
        if delay and self.faults.ack_before_aux:
            staged = [(addr, bytearray(n)) for addr, n in zip(dst.tolist(), lengths.tolist())]
            for _, buf in staged:
                read_into(ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)), len(buf))
            timer = threading.Timer(delay, self._land_later, args=(room, staged))
            timer.daemon = True
            timer.start()
            return None
        if delay:
            time.sleep(delay)
        if not flags & wire.FLAG_AUX and self.faults.discards_kv(room, self.tp_rank):
            for n in lengths.tolist():
                scratch = (ctypes.c_char * n)()
                read_into(ctypes.addressof(scratch), n)
            return None
        for addr, n in zip(dst.tolist(), lengths.tolist()):
            read_into(addr, n)
        return None

    def _land_later(self, room: int, staged: list[tuple[int, bytearray]]) -> None:
        with self.receivers.lock:
            state = self.receivers.rooms.get(room)
            if self._stopping.is_set() or state is None or state.status == KVPoll.Failed:
                return  # the room ended meanwhile: its slot may belong to someone else now
            for addr, buf in staged:
                ctypes.memmove(addr, bytes(buf), len(buf))

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.tp_rank in self.faults.gone_ranks:
                conn.close()
                continue
            threading.Thread(
                target=self._serve,
                args=(conn,),
                daemon=True,
                name=f"kvbridge-fake-conn-{self.port}",
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while not self._stopping.is_set():
                try:
                    room, flags, dst, lengths = wire.decode_header(conn)
                except (ConnectionError, OSError):
                    return
                except wire.ProtocolError as exc:
                    log.warning("fake transport %s: dropping connection: %s", self.label, exc)
                    return
                try:
                    error = self.land(
                        room,
                        flags,
                        dst,
                        lengths,
                        lambda addr, n: wire.recv_exact_into(conn, wire.memory_at(addr, n)),
                    )
                    if error:
                        payload = sum(lengths.tolist())  # exact: the lengths are the peer's
                        if min(lengths.tolist(), default=0) < 0 or payload > _MAX_DRAIN:
                            # No payload size to skip: the framing cannot be trusted after it.
                            wire.send_reply(conn, False, error)
                            log.warning(
                                "fake transport %s: dropping connection: %s", self.label, error
                            )
                            return
                        _drain(conn, payload)
                    wire.send_reply(conn, error is None, error or "")
                except OSError:
                    return


def _drain(conn: socket.socket, size: int) -> None:
    scratch = bytearray(min(size, _DRAIN_CHUNK) or 1)
    while size > 0:
        view = memoryview(scratch)[: min(size, len(scratch))]
        wire.recv_exact_into(conn, view)
        size -= view.nbytes
