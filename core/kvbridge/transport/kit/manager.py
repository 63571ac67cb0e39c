"""A manager base class built on the book, the regions and the workers: a transport subclasses
it and writes only its native calls."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kvbridge.status import KVPoll
from kvbridge.transport.kit.book import RoomBook, RoomState
from kvbridge.transport.kit.regions import RegionSet
from kvbridge.transport.kit.workers import PeerWorkers, PipelinedPeerWorkers, Steps
from kvbridge.types import Descriptors, MemoryRegion, PollResult, SendChunk


class BookedManager:
    """Base class for a transport manager: subclasses write only the native parts.

    It keeps receivers and senders in :class:`RoomBook`\\ s, checks source memory, runs every
    chunk for a peer as one job on a worker thread of that peer, and writes the KV runs first
    and the aux runs after them (so the room stamp never lands before the pages). Override
    :meth:`peer_key` and either :meth:`write` (blocking: one write to a peer at a time, or
    one per lane) or the non-blocking trio :meth:`start_write`, :meth:`write_done` and
    :meth:`end_write` (up to :meth:`writes_in_flight` rooms' writes in flight per peer,
    checked by one thread); optionally :meth:`check_peer`, :meth:`connect_peer`,
    :meth:`release`, and the fault-injection hooks.
    """

    def __init__(
        self, label: str, kv_regions: Sequence[MemoryRegion], aux_regions: Sequence[MemoryRegion]
    ) -> None:
        self.label = label
        self.regions = RegionSet([*kv_regions, *aux_regions])
        self.aux_regions = RegionSet(aux_regions)
        self.receivers = RoomBook(label)
        self.senders = RoomBook(label)
        self._workers: PeerWorkers
        if self.pipelines_writes():
            self._workers = PipelinedPeerWorkers(f"kvbridge-send-{label}", self.writes_in_flight())
        else:
            self._workers = PeerWorkers(f"kvbridge-send-{label}")
        self._closed = False

    # -- what a transport provides ---------------------------------------------------------------

    @property
    def endpoint(self) -> dict[str, Any]:
        raise NotImplementedError

    def peer_key(self, peer: Mapping[str, Any]) -> str:
        """A stable name for a peer endpoint (one worker thread per key)."""
        raise NotImplementedError

    def check_peer(self, peer: Mapping[str, Any]) -> None:
        """Raise ValueError if ``peer`` is not this transport's endpoint."""

    def connect_peer(self, peer: Mapping[str, Any]) -> None:
        """Sender side, at init: make the peer known to the library (must not block long)."""

    def write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> str | None:
        """Perform the writes (blocking is fine: this runs on the peer's worker thread).

        Returns None on success or the failure reason.
        """
        raise NotImplementedError

    def start_write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> Any:
        """Non-blocking writes, instead of :meth:`write`: start ``runs``' writes and return a
        handle for :meth:`write_done` and :meth:`end_write`; raise if they cannot start (the
        message fails the room). Runs on the peer's worker thread; must not block long.

        A transport that overrides this (and the other two) has up to
        :meth:`writes_in_flight` rooms' writes to one peer in flight at once, all checked by
        one thread per peer: with many requests in flight that is one wake-up for all of
        them, not one blocking wait each.
        """
        raise NotImplementedError

    def write_done(self, handle: Any) -> bool:
        """True once every byte of ``handle``'s writes landed, False while in flight; raise
        if they failed (the message fails the room). Peer's worker thread; must not block."""
        raise NotImplementedError

    def end_write(self, handle: Any) -> None:
        """Free ``handle`` (done, failed or timed out): called once for each started write.
        Must not raise."""

    def writes_in_flight(self) -> int:
        """Non-blocking writes: at most this many rooms' writes in flight per peer."""
        return 64

    def write_timeout(self) -> float:
        """Non-blocking writes: a write still in flight after this many seconds fails its
        room (a blocking :meth:`write` keeps its own time)."""
        return 30.0

    def pipelines_writes(self) -> bool:
        """Whether this transport writes through :meth:`start_write` (it overrides it)."""
        return type(self).start_write is not BookedManager.start_write

    def release(self) -> None:
        """Deregister memory and free library resources (called once by :meth:`close`)."""

    def lanes_per_peer(self) -> int:
        """Worker threads per peer (default 1). With more, rooms spread over them by room
        number, so a blocking write of one room does not hold up the next room's; each room's
        chunks still run in order on one lane, its aux rows after its KV pages."""
        return 1

    def init_delay(self) -> float:
        return 0.0

    def send_delay(self) -> float:
        return 0.0

    def injected_failure(self, room: int) -> str | None:
        return None

    def injects_failures(self) -> bool:
        """Whether :meth:`injected_failure` may fail a room now; polls skip it when not."""
        return type(self).injected_failure is not BookedManager.injected_failure

    # -- the shared mechanics --------------------------------------------------------------------

    def init(self, book: RoomBook, room: int, peers: tuple[Mapping[str, Any], ...]) -> None:
        for peer in peers:
            self.check_peer(peer)
            if book is self.senders:
                self.connect_peer(peer)
        book.init(room, peers, delay=self.init_delay())

    def poll(self, book: RoomBook, rooms: np.ndarray) -> PollResult:
        return book.poll(rooms, self.injected_failure if self.injects_failures() else None)

    def send(self, room: int, chunk: SendChunk) -> None:
        for write in chunk.writes:
            self.regions.check_sources(room, write.descriptors, self.label)
        state = self.senders.start_send(room, chunk, jobs=len(chunk.writes))
        if state is None:
            return
        ready_at = time.monotonic() + self.send_delay()
        workers = self._workers
        if isinstance(workers, PipelinedPeerWorkers):
            for write in chunk.writes:
                peer = state.peers[write.peer]
                steps = functools.partial(
                    self._steps, state, room, peer, write.descriptors, chunk.is_last, ready_at
                )
                workers.submit_steps(self.peer_key(peer), room, steps)
            return
        lanes = self.lanes_per_peer()
        for write in chunk.writes:
            peer = state.peers[write.peer]
            job = functools.partial(
                self._job, state, room, peer, write.descriptors, chunk.is_last, ready_at
            )
            key = self.peer_key(peer)
            workers.submit(key if lanes == 1 else f"{key}#{room % lanes}", job)

    def _job(
        self,
        state: RoomState,
        room: int,
        peer: Mapping[str, Any],
        d: Descriptors,
        is_last: bool,
        ready_at: float,
    ) -> None:
        wait = ready_at - time.monotonic()
        if wait > 0 and self._workers.closing.wait(wait):
            return  # closed while it waited: it never started
        error = None
        for aux, runs in self._kv_then_aux(d):
            if state.status == KVPoll.Failed:
                break  # aborted or failed meanwhile: its aux row must not land now
            try:
                error = self.write(room, peer, runs, aux)
            except Exception as exc:  # a failed write fails the room, never the thread
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                break
        self.senders.finish_job(state, error, is_last)

    def _steps(
        self,
        state: RoomState,
        room: int,
        peer: Mapping[str, Any],
        d: Descriptors,
        is_last: bool,
        ready_at: float,
    ) -> Steps:
        """:meth:`_job` for non-blocking writes: yields while a write is in flight."""
        error = None
        try:
            while time.monotonic() < ready_at:
                yield False
            for aux, runs in self._kv_then_aux(d):
                if state.status == KVPoll.Failed:
                    break  # aborted or failed meanwhile: its aux row must not land now
                handle = self.start_write(room, peer, runs, aux)
                started = True  # the worker's next pass comes soon: something moved
                try:
                    deadline = time.monotonic() + self.write_timeout()
                    while not self.write_done(handle):
                        if time.monotonic() > deadline:
                            error = (
                                f"write of room {room} still in flight after "
                                f"{self.write_timeout():g}s"
                            )
                            break
                        yield started
                        started = False
                finally:
                    self.end_write(handle)
                if error is not None:
                    break
        except Exception as exc:  # a failed write fails the room, never the thread
            error = f"{type(exc).__name__}: {exc}"
        self.senders.finish_job(state, error, is_last)

    def _kv_then_aux(self, d: Descriptors) -> list[tuple[bool, Descriptors]]:
        """``(is_aux, runs)``: the KV runs, then the aux runs; devices travel with the runs."""
        n = len(d)
        if not n:
            return []
        is_aux = self.aux_regions.covers(d.src, d.lengths)
        k = int(is_aux.sum())
        if k == 0 or k == n:
            return [(k == n, d)]
        if is_aux[n - k :].all():  # the core appends the aux row: views, no copies
            return [(False, d.select(slice(0, n - k))), (True, d.select(slice(n - k, n)))]
        return [(False, d.select(~is_aux)), (True, d.select(is_aux))]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._workers.close()
        self.release()
