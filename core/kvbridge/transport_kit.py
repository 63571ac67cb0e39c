"""Building blocks most transports need, so a plugin only writes the native calls.

- :class:`RegionSet`: is a batch of (addr, length) runs inside registered memory?
- :class:`RoomBook`: thread-safe per-room statuses with the contract's rules built in
  (forward only, sticky Failed, idempotent clear, late results for cleared rooms ignored).
- :class:`PeerWorkers`: one thread per peer running blocking native calls in submission
  order, so ``send`` never blocks the scheduler and writes to one peer stay ordered.
- :class:`BookedManager` + :class:`ManagerHooks`: a manager base class that uses all of the
  above, and the hook implementations for it; a transport then writes only its native calls.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from kvbridge.errors import MemoryRegistrationError
from kvbridge.hookspecs import KVBRIDGE_API_VERSION, hookimpl
from kvbridge.status import KVPoll
from kvbridge.types import Descriptors, MemoryRegion, PollResult, SendChunk

log = logging.getLogger("kvbridge")


def transport_options(
    name: str, given: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge a transport's options over its defaults; unknown keys are a clear error."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {name} transport option(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


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
    #: Row in the book's status arrays; -1 once the room is cleared (the row may be reused).
    row: int = -1

    def fail(self, reason: str) -> None:
        if self.status != KVPoll.Failed:
            self.status = KVPoll.Failed
            self.reason = reason


class RoomBook:
    """Statuses of one side (receivers or senders) of a manager, safe across threads.

    Besides the :class:`RoomState` objects, every live room's status and ``ready_at`` sit in
    numpy rows, kept in step under the lock, so :meth:`poll` answers a whole step's rooms
    with a few array operations instead of a Python loop (sorted room ids -> rows, rebuilt
    only after rooms come or go).
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.lock = threading.Lock()
        self.rooms: dict[int, RoomState] = {}
        self._status = np.zeros(64, dtype=np.uint8)
        self._ready_at = np.zeros(64, dtype=np.float64)
        self._free_rows: list[int] = list(range(63, -1, -1))
        self._keys = np.zeros(0, dtype=np.uint64)  # live rooms, sorted
        self._key_rows = np.zeros(0, dtype=np.int64)  # their rows
        self._stale = False
        #: The last polled rooms and their (rows, known): a queue polls the same rooms
        #: step after step, so the lookup is redone only after rooms come or go.
        self._polled: tuple[bytes, np.ndarray, np.ndarray, bool] | None = None
        self._latest_ready = 0.0  # no room is held in Bootstrapping after this time

    def _sync(self, state: RoomState) -> None:
        """Mirror ``state`` into its row (lock held). A cleared room's state has no row."""
        if state.row >= 0:
            self._status[state.row] = state.status
            self._ready_at[state.row] = state.ready_at

    def _index(self) -> None:
        if self._stale:
            keys = np.fromiter(self.rooms, dtype=np.uint64, count=len(self.rooms))
            rows = np.fromiter(
                (s.row for s in self.rooms.values()), dtype=np.int64, count=len(self.rooms)
            )
            order = np.argsort(keys)
            self._keys, self._key_rows = keys[order], rows[order]
            self._stale = False
            self._polled = None

    def _rows(self, rooms: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Rows of ``rooms`` and which are known (lock held)."""
        self._index()
        key = rooms.tobytes()
        last = self._polled
        if last is not None and last[0] == key:
            return last[1], last[2], last[3]
        keys = self._keys
        if len(keys):
            at = np.minimum(np.searchsorted(keys, rooms), len(keys) - 1)
            known = keys[at] == rooms
            rows = self._key_rows[at]
        else:
            known = np.zeros(len(rooms), dtype=bool)
            rows = np.zeros(len(rooms), dtype=np.int64)
        every = bool(known.all())
        self._polled = (key, rows, known, every)
        return rows, known, every

    def construct(self, room: int) -> None:
        if room == 0:
            raise ValueError("room 0 is reserved")
        with self.lock:
            if room in self.rooms:
                raise ValueError(f"room {room} already exists on {self.label}")
            if not self._free_rows:
                size = len(self._status)
                self._status = np.concatenate([self._status, np.zeros(size, dtype=np.uint8)])
                self._ready_at = np.concatenate([self._ready_at, np.zeros(size)])
                self._free_rows = list(range(2 * size - 1, size - 1, -1))
            state = RoomState(status=KVPoll.Bootstrapping, row=self._free_rows.pop())
            self.rooms[room] = state
            self._sync(state)
            self._stale = True

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
            self._latest_ready = max(self._latest_ready, state.ready_at)
            if state.status == KVPoll.Bootstrapping:
                state.status = KVPoll.WaitingForInput
            self._sync(state)

    def advance(self, room: int, status: KVPoll) -> None:
        with self.lock:
            state = self._live(room)
            if state.status != KVPoll.Failed and state.status < status:
                state.status = status
                self._sync(state)

    def fail(self, room: int, reason: str) -> None:
        with self.lock:
            state = self.rooms.get(room)
            if state is not None:
                state.fail(reason)
                self._sync(state)

    def abort(self, room: int, reason: str) -> None:
        with self.lock:
            state = self.rooms.get(room)
            if state is not None and state.status != KVPoll.Success:
                state.fail(f"aborted: {reason}")
                self._sync(state)

    def clear(self, room: int) -> None:
        with self.lock:
            state = self.rooms.pop(room, None)
            if state is not None:
                self._free_rows.append(state.row)
                state.row = -1  # late job results for it must not touch the reused row
                self._stale = True

    def drained(self, rooms: np.ndarray) -> np.ndarray:
        """True where a room has no job outstanding (or is unknown): nothing more will land.

        After :meth:`abort` no job starts writing (jobs check the status first), so once the
        ones already writing finish, ``pending`` reaches 0 for good.
        """
        with self.lock:
            return np.array(
                [
                    (state := self.rooms.get(room)) is None or state.pending == 0
                    for room in rooms.tolist()
                ],
                dtype=bool,
            )

    def accepting(self, room: int) -> bool:
        """Whether writes for ``room`` may land (it exists and has not failed)."""
        with self.lock:
            state = self.rooms.get(room)
            return state is not None and state.status != KVPoll.Failed

    def poll(
        self, wanted: np.ndarray, injected: Callable[[int], str | None] | None = None
    ) -> PollResult:
        """Statuses of ``wanted`` in order (unknown rooms Failed; Bootstrapping until
        ``ready_at``), reasons for the failed ones. ``injected(room)``, when given, may fail
        a known room first (fault plans)."""
        now = time.monotonic()
        rooms = np.asarray(wanted).astype(np.uint64, copy=False)
        failures: dict[int, str] = {}
        with self.lock:
            if injected is not None:
                for room in rooms.tolist():
                    state = self.rooms.get(room)
                    if state is not None and (reason := injected(room)):
                        state.fail(reason)
                        self._sync(state)
            rows, known, every = self._rows(rooms)
            statuses = self._status[rows]
            if not every:
                statuses[~known] = KVPoll.Failed
            if now < self._latest_ready:
                held = (statuses != KVPoll.Failed) & (now < self._ready_at[rows])
                statuses[held & known] = KVPoll.Bootstrapping
            if not statuses.all():  # Failed is 0: reasons only when something failed
                for i in np.flatnonzero(statuses == KVPoll.Failed).tolist():
                    room = int(rooms[i])
                    state = self.rooms.get(room)
                    failures[room] = (
                        f"room {room} is unknown to {self.label}"
                        if state is None
                        else state.reason or "failed"
                    )
        return PollResult(statuses, failures)

    def start_send(self, room: int, chunk: SendChunk, jobs: int) -> RoomState | None:
        """Account ``jobs`` outstanding jobs for a chunk; None if the room already failed."""
        with self.lock:
            state = self._live(room)
            if state.status == KVPoll.Failed:
                return None  # failed already (a peer vanished, an abort): nothing to send
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
            self._sync(state)
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
            self._sync(state)


class PeerWorkers:
    """One daemon thread per peer key; jobs for one key run in submission order.

    :meth:`close` drops the jobs that have not started and waits only for the ones running:
    a closing manager must not first perform its whole backlog (each write to a peer that no
    longer reads may block for the transport's I/O timeout).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queues: dict[str, queue.SimpleQueue[Callable[[], None] | None]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: Set by :meth:`close`; jobs may wait on it instead of sleeping.
        self.closing = threading.Event()

    def submit(self, key: str, job: Callable[[], None]) -> None:
        with self._lock:
            if self.closing.is_set():
                return  # closed: nothing starts any more
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

    def _run(self, q: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while True:
            job = q.get()
            if job is None or self.closing.is_set():
                return
            job()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker; waits for the jobs in flight, ``timeout`` seconds in all."""
        with self._lock:
            self.closing.set()
            for q in self._queues.values():
                q.put(None)
            threads, self._threads = self._threads, []
            self._queues.clear()
        deadline = time.monotonic() + timeout
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


class BookedManager:
    """Base class for a transport manager: subclasses write only the native parts.

    It keeps receivers and senders in :class:`RoomBook`\\ s, checks source memory, runs every
    chunk for a peer as one job on :class:`PeerWorkers`, and calls :meth:`write` with the KV
    runs first and the aux runs after them (so the room stamp never lands before the pages).
    Override :meth:`peer_key` and :meth:`write`; optionally :meth:`check_peer`,
    :meth:`connect_peer`, :meth:`release`, and the fault-injection hooks.
    """

    def __init__(
        self, label: str, kv_regions: Sequence[MemoryRegion], aux_regions: Sequence[MemoryRegion]
    ) -> None:
        self.label = label
        self.regions = RegionSet([*kv_regions, *aux_regions])
        self.aux_regions = RegionSet(aux_regions)
        self.receivers = RoomBook(label)
        self.senders = RoomBook(label)
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

    def release(self) -> None:
        """Deregister memory and free library resources (called once by :meth:`close`)."""

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
        for write in chunk.writes:
            peer = state.peers[write.peer]
            job = functools.partial(
                self._job, state, room, peer, write.descriptors, chunk.is_last, ready_at
            )
            self._workers.submit(self.peer_key(peer), job)

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
        if state.status != KVPoll.Failed:
            is_aux = self.aux_regions.covers(d.src, d.lengths)
            for aux, mask in ((False, ~is_aux), (True, is_aux)):
                if not mask.any():
                    continue
                runs = d.select(mask)  # devices travel with the runs
                try:
                    error = self.write(room, peer, runs, aux)
                except Exception as exc:  # a failed write fails the room, never the thread
                    error = f"{type(exc).__name__}: {exc}"
                if error is not None:
                    break
        self.senders.finish_job(state, error, is_last)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._workers.close()
        self.release()


#: The plugin API of a plugin whose ``ManagerHooks`` states no ``api_version``: the class took
#: no such keyword only while the plugin API was 1.0.
UNSTATED_API_VERSION = "1.0"


class ManagerHooks:
    """Every operation hook of the contract, delegating to a :class:`BookedManager`.

    A plugin module exposes one instance; its entry point names it::

        API_VERSION = "1.1"  # the kvbridge plugin API this plugin was written for
        plugin = ManagerHooks(
            "mytransport", MyManager, api_version=API_VERSION, capabilities={"cross_process"}
        )
        # [project.entry-points."kvbridge.transports"] mytransport = "my_pkg.plugin:plugin"

    ``create(config, rank, kv_regions, aux_regions)`` builds the manager. ``api_version`` is
    reported as is: it must be the version the plugin was *written for* (a literal in the
    plugin), never the running core's ``KVBRIDGE_API_VERSION``, or the load-time check could
    not refuse a plugin written for another API. Left out (plugins written before this keyword
    existed) it is :data:`UNSTATED_API_VERSION`, with a logged note.
    """

    def __init__(
        self,
        name: str,
        create: Callable[..., BookedManager],
        *,
        api_version: str | None = None,
        capabilities: Sequence[str] = (),
        description: str = "",
    ) -> None:
        from kvbridge.types import TransportInfo

        if api_version is None:
            api_version = UNSTATED_API_VERSION
            log.warning(
                "transport %r states no api_version (ManagerHooks took none while the API "
                "was 1.0): taken as kvbridge plugin API %s, this kvbridge speaks %s; pass "
                "api_version= the version the plugin was written for",
                name,
                api_version,
                KVBRIDGE_API_VERSION,
            )

        self.info = TransportInfo(
            name, str(api_version), frozenset(str(c) for c in capabilities), description
        )
        self.create = create

    @hookimpl
    def kvbridge_transport_info(self) -> Any:
        return self.info

    @hookimpl
    def kvbridge_manager_create(
        self, config: Any, rank: Any, kv_regions: Any, aux_regions: Any
    ) -> BookedManager:
        return self.create(config, rank, kv_regions, aux_regions)

    @hookimpl
    def kvbridge_manager_endpoint(self, manager: BookedManager) -> Any:
        return manager.endpoint

    @hookimpl
    def kvbridge_manager_close(self, manager: BookedManager) -> None:
        manager.close()

    @hookimpl
    def kvbridge_receiver_construct(self, manager: BookedManager, room: int) -> None:
        manager.receivers.construct(room)

    @hookimpl
    def kvbridge_receiver_init(self, manager: BookedManager, room: int, peers: Any) -> None:
        manager.init(manager.receivers, room, peers)

    @hookimpl
    def kvbridge_receiver_send_metadata(
        self, manager: BookedManager, room: int, kv_indices: np.ndarray, aux_index: int
    ) -> None:
        manager.receivers.advance(room, KVPoll.Transferring)

    @hookimpl
    def kvbridge_receiver_poll(self, manager: BookedManager, rooms: np.ndarray) -> PollResult:
        return manager.poll(manager.receivers, rooms)

    @hookimpl
    def kvbridge_receiver_abort(self, manager: BookedManager, room: int, reason: str) -> None:
        manager.receivers.abort(room, reason)

    @hookimpl
    def kvbridge_receiver_clear(self, manager: BookedManager, room: int) -> None:
        manager.receivers.clear(room)

    @hookimpl
    def kvbridge_sender_construct(self, manager: BookedManager, room: int) -> None:
        manager.senders.construct(room)

    @hookimpl
    def kvbridge_sender_init(self, manager: BookedManager, room: int, peers: Any) -> None:
        manager.init(manager.senders, room, peers)

    @hookimpl
    def kvbridge_sender_send(self, manager: BookedManager, room: int, chunk: SendChunk) -> None:
        manager.send(room, chunk)

    @hookimpl
    def kvbridge_sender_poll(self, manager: BookedManager, rooms: np.ndarray) -> PollResult:
        return manager.poll(manager.senders, rooms)

    @hookimpl
    def kvbridge_sender_abort(self, manager: BookedManager, room: int, reason: str) -> None:
        manager.senders.abort(room, reason)

    @hookimpl
    def kvbridge_sender_drained(self, manager: BookedManager, rooms: np.ndarray) -> np.ndarray:
        return manager.senders.drained(rooms)

    @hookimpl
    def kvbridge_sender_clear(self, manager: BookedManager, room: int) -> None:
        manager.senders.clear(room)
