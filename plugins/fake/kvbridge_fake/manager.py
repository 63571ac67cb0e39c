"""The Fake transport's per-rank state: registered regions, a loopback listener that lands
incoming writes, and a worker thread that performs outgoing writes off the scheduler thread.

Writes to a manager in the same process are a bounds-checked memmove; writes to another
process go over a loopback TCP connection to that manager's listener, which reads the payload
straight into the registered memory. A socket (rather than shared memory) lets the Fake work
with any engine-allocated buffer, and makes a dead peer look like it does on real networks:
a refused or reset connection.
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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from kvbridge.config import TransferConfig
from kvbridge.status import KVPoll
from kvbridge.transport_kit import PeerWorkers, RegionSet, RoomBook, RoomState
from kvbridge.types import Descriptors, MemoryRegion, PollResult, RankIdentity, SendChunk
from kvbridge_fake import wire
from kvbridge_fake.faults import FaultPlan

log = logging.getLogger("kvbridge.fake")

_LOCAL_MANAGERS: dict[str, FakeManager] = {}
_LOCAL_LOCK = threading.Lock()
_DRAIN_CHUNK = 1 << 20


class FakeManager:
    def __init__(
        self,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: tuple[MemoryRegion, ...],
        aux_regions: tuple[MemoryRegion, ...],
    ) -> None:
        options = config.transport_options
        unknown = sorted(set(options) - {"faults", "host", "io_timeout"})
        if unknown:
            raise ValueError(
                f"unknown fake transport option(s) {unknown}; known: faults, host, io_timeout"
            )
        self.faults = FaultPlan.from_options(options)
        self.rank = rank
        self.tp_rank = rank.tp_rank
        self.io_timeout = float(options.get("io_timeout", 30.0))
        self.id = uuid.uuid4().hex
        self.regions = RegionSet(kv_regions + aux_regions)
        self.aux_regions = RegionSet(aux_regions)
        self._connections: dict[str, socket.socket] = {}
        self._closed = threading.Event()

        self._listener = socket.create_server((options.get("host", "127.0.0.1"), 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self.receivers = RoomBook(self.label)
        self.senders = RoomBook(self.label)
        self._workers = PeerWorkers(f"kvbridge-fake-send-{self.port}")
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

    @property
    def label(self) -> str:
        return f"{self.rank.label}@{self.host}:{self.port}"

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with _LOCAL_LOCK:
            _LOCAL_MANAGERS.pop(self.id, None)
        self._workers.close()
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

    # -- rooms ---------------------------------------------------------------------------------

    def init(self, book: RoomBook, room: int, peers: tuple[Mapping[str, Any], ...]) -> None:
        for peer in peers:
            if not {"id", "host", "port", "pid"} <= set(peer):
                raise ValueError(f"not a fake transport endpoint: {peer!r}")
        book.init(room, peers, delay=self.faults.delay_for("init", self.tp_rank))

    def poll(self, book: RoomBook, wanted: np.ndarray) -> PollResult:
        if not self.faults.fail_rooms:
            return book.poll(wanted)
        return book.poll(wanted, self._injected_failure)

    def _injected_failure(self, room: int) -> str | None:
        if self.faults.fails(room, self.tp_rank):
            return "injected failure (fake transport fault plan)"
        return None

    # -- sending -------------------------------------------------------------------------------

    def send(self, room: int, chunk: SendChunk) -> None:
        for write in chunk.writes:
            self.regions.check_sources(room, write.descriptors, self.label)
        state = self.senders.start_send(room, chunk, jobs=len(chunk.writes))
        if state is None:
            return
        ready_at = time.monotonic() + self.faults.delay_for("send", self.tp_rank)
        for write in chunk.writes:
            peer = state.peers[write.peer]
            self._workers.submit(
                str(peer["id"]),
                lambda peer=peer, d=write.descriptors: self._run_job(
                    state, room, peer, d, chunk.is_last, ready_at
                ),
            )

    def _run_job(
        self,
        state: RoomState,
        room: int,
        peer: Mapping[str, Any],
        d: Descriptors,
        is_last: bool,
        ready_at: float,
    ) -> None:
        wait = ready_at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        error = None
        if state.status != KVPoll.Failed:
            try:
                self._deliver(peer, room, d, is_last)
            except Exception as exc:  # every delivery error fails the room, never the thread
                error = str(exc)
        self.senders.finish_job(state, error, is_last)

    def _deliver(self, peer: Mapping[str, Any], room: int, d: Descriptors, is_last: bool) -> None:
        # KV pages first, aux rows last: the room stamp must never land before the pages.
        is_aux = self.aux_regions.covers(d.src, d.lengths)
        for flags, mask in ((0, ~is_aux), (wire.FLAG_AUX, is_aux)):
            if not mask.any():
                continue
            src, dst, lengths = d.src[mask], d.dst[mask], d.lengths[mask]
            target = _LOCAL_MANAGERS.get(peer["id"]) if peer["pid"] == os.getpid() else None
            if target is not None:
                sources = iter(src.tolist())

                def copy_next(addr: int, n: int, sources: Iterator[int] = sources) -> None:
                    ctypes.memmove(addr, next(sources), n)

                error = target.land(room, flags, dst, lengths, copy_next)
                if error:
                    raise RuntimeError(error)
            elif peer["pid"] == os.getpid() and peer["id"] not in _LOCAL_MANAGERS:
                raise ConnectionError(f"peer {peer['host']}:{peer['port']} is gone (closed)")
            else:
                self._deliver_remote(peer, room, flags, src, dst, lengths)

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
        bad = ~self.regions.covers(dst, lengths)
        if bad.any():
            i = int(np.argmax(bad))
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
        for addr, n in zip(dst.tolist(), lengths.tolist()):
            read_into(addr, n)
        return None

    def _land_later(self, room: int, staged: list[tuple[int, bytearray]]) -> None:
        with self.receivers.lock:
            state = self.receivers.rooms.get(room)
            if self._closed.is_set() or state is None or state.status == KVPoll.Failed:
                return  # the room ended meanwhile: its slot may belong to someone else now
            for addr, buf in staged:
                ctypes.memmove(addr, bytes(buf), len(buf))

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
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
            while not self._closed.is_set():
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
                        _drain(conn, int(lengths.sum()))
                    wire.send_reply(conn, error is None, error or "")
                except OSError:
                    return


def _drain(conn: socket.socket, size: int) -> None:
    scratch = bytearray(min(size, _DRAIN_CHUNK) or 1)
    while size > 0:
        view = memoryview(scratch)[: min(size, len(scratch))]
        wire.recv_exact_into(conn, view)
        size -= view.nbytes
