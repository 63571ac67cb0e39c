"""Building blocks most transports need, so a plugin only writes the native calls.

- :class:`RegionSet`: is a batch of (addr, length) runs inside registered memory?
- :class:`RoomBook`: thread-safe per-room statuses with the contract's rules built in
  (forward only, sticky Failed, idempotent clear, late results for cleared rooms ignored).
- :class:`PeerWorkers`: one thread per peer running blocking native calls in submission
  order, so ``send`` never blocks the scheduler and writes to one peer stay ordered.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from kvbridge.errors import MemoryRegistrationError
from kvbridge.status import KVPoll
from kvbridge.types import Descriptors, MemoryRegion, PollResult, SendChunk


class RegionSet:
    """Fast membership test of (addr, length) runs against registered regions."""

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        ordered = sorted(regions, key=lambda r: r.addr)
        self.starts = np.array([r.addr for r in ordered], dtype=np.int64)
        self.ends = np.array([r.end for r in ordered], dtype=np.int64)

    def covers(self, addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if not len(self.starts):
            return np.zeros(len(addrs), dtype=bool)
        idx = np.searchsorted(self.starts, addrs, side="right") - 1
        safe = np.clip(idx, 0, None)
        return (idx >= 0) & (lengths >= 0) & (addrs + lengths <= self.ends[safe])

    def check_sources(self, room: int, descriptors: Descriptors, where: str) -> None:
        """Raise :class:`MemoryRegistrationError` naming the first unregistered source run."""
        bad = ~self.covers(descriptors.src, descriptors.lengths)
        if bad.any():
            i = int(np.argmax(bad))
            raise MemoryRegistrationError(
                f"room {room}: source [{int(descriptors.src[i]):#x}, "
                f"+{int(descriptors.lengths[i])}) is not in memory registered on {where}"
            )


@attrs.define
class RoomState:
    status: int
    reason: str | None = None
    peers: tuple[Mapping[str, Any], ...] = ()
    ready_at: float = 0.0
    pending: int = 0
    last_done: bool = False

    def fail(self, reason: str) -> None:
        if self.status != KVPoll.Failed:
            self.status = KVPoll.Failed
            self.reason = reason


class RoomBook:
    """Statuses of one side (receivers or senders) of a manager, safe across threads."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.lock = threading.Lock()
        self.rooms: dict[int, RoomState] = {}

    def construct(self, room: int) -> None:
        if room == 0:
            raise ValueError("room 0 is reserved")
        with self.lock:
            if room in self.rooms:
                raise ValueError(f"room {room} already exists on {self.label}")
            self.rooms[room] = RoomState(status=KVPoll.Bootstrapping)

    def _live(self, room: int) -> RoomState:
        state = self.rooms.get(room)
        if state is None:
            raise KeyError(f"room {room} was never constructed on {self.label}")
        return state

    def init(self, room: int, peers: tuple[Mapping[str, Any], ...], delay: float = 0.0) -> None:
        with self.lock:
            state = self._live(room)
            state.peers = peers
            state.ready_at = time.monotonic() + delay
            if state.status == KVPoll.Bootstrapping:
                state.status = KVPoll.WaitingForInput

    def advance(self, room: int, status: KVPoll) -> None:
        with self.lock:
            state = self._live(room)
            if state.status != KVPoll.Failed and state.status < status:
                state.status = status

    def fail(self, room: int, reason: str) -> None:
        with self.lock:
            state = self.rooms.get(room)
            if state is not None:
                state.fail(reason)

    def abort(self, room: int, reason: str) -> None:
        with self.lock:
            state = self.rooms.get(room)
            if state is not None and state.status != KVPoll.Success:
                state.fail(f"aborted: {reason}")

    def clear(self, room: int) -> None:
        with self.lock:
            self.rooms.pop(room, None)

    def accepting(self, room: int) -> bool:
        """Whether writes for ``room`` may land (it exists and has not failed)."""
        with self.lock:
            state = self.rooms.get(room)
            return state is not None and state.status != KVPoll.Failed

    def poll(
        self, wanted: np.ndarray, injected: Callable[[int], str | None] | None = None
    ) -> PollResult:
        now = time.monotonic()
        statuses = np.empty(len(wanted), dtype=np.uint8)
        failures: dict[int, str] = {}
        with self.lock:
            for i, room in enumerate(wanted.tolist()):
                state = self.rooms.get(room)
                if state is None:
                    statuses[i] = KVPoll.Failed
                    failures[room] = f"room {room} is unknown to {self.label}"
                    continue
                if injected is not None:
                    reason = injected(room)
                    if reason:
                        state.fail(reason)
                status = state.status
                if status == KVPoll.Failed:
                    failures[room] = state.reason or "failed"
                elif now < state.ready_at:
                    status = KVPoll.Bootstrapping
                statuses[i] = status
        return PollResult(statuses, failures)

    def start_send(self, room: int, chunk: SendChunk, jobs: int) -> RoomState | None:
        """Account ``jobs`` outstanding jobs for a chunk; None if the room already failed."""
        with self.lock:
            state = self._live(room)
            if state.status < KVPoll.WaitingForInput:
                raise RuntimeError(f"room {room}: send before init on {self.label}")
            for write in chunk.writes:
                if not 0 <= write.peer < len(state.peers):
                    raise IndexError(
                        f"room {room}: peer {write.peer} not among "
                        f"{len(state.peers)} peers given to init"
                    )
            if state.status == KVPoll.Failed:
                return None
            state.status = max(state.status, KVPoll.Transferring)
            state.pending += jobs
            if chunk.is_last and jobs == 0:
                state.last_done = True
                if state.pending == 0:
                    state.status = KVPoll.Success
            return state

    def finish_job(self, state: RoomState, error: str | None, is_last: bool) -> None:
        """One job ended. The state object may belong to a cleared room: then nobody sees it."""
        with self.lock:
            state.pending -= 1
            if error is not None:
                state.fail(error)
            elif is_last:
                state.last_done = True
            if state.last_done and state.pending == 0 and state.status != KVPoll.Failed:
                state.status = KVPoll.Success


class PeerWorkers:
    """One daemon thread per peer key; jobs for one key run in submission order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queues: dict[str, queue.SimpleQueue[Callable[[], None] | None]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, key: str, job: Callable[[], None]) -> None:
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = queue.SimpleQueue()
                t = threading.Thread(
                    target=self._run,
                    args=(q,),
                    daemon=True,
                    name=f"{self.name}-{len(self._threads)}",
                )
                t.start()
                self._threads.append(t)
        q.put(job)

    @staticmethod
    def _run(q: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while True:
            job = q.get()
            if job is None:
                return
            job()

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            for q in self._queues.values():
                q.put(None)
            threads, self._threads = self._threads, []
            self._queues.clear()
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)
