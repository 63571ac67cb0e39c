"""Thread-safe per-room statuses with the contract's rules built in.

Forward only, sticky Failed, idempotent clear, late results for cleared rooms ignored: what
``kvbridge_receiver_poll`` and ``kvbridge_sender_poll`` must answer, kept in numpy rows so a
whole step's rooms are answered with a few array operations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np

from kvbridge.status import KVPoll
from kvbridge.types import PollResult, SendChunk


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
        #: Bumped by every change of a status or of the rooms (lock held).
        self._version = 0
        #: The last answer: (polled rooms, version, statuses, failures). A queue polls the
        #: same rooms step after step and mostly nothing changed in between: then the
        #: answer is the last one, found with one comparison.
        self._answer: tuple[bytes, int, np.ndarray, dict[int, str]] | None = None

    def _sync(self, state: RoomState) -> None:
        """Mirror ``state`` into its row (lock held). A cleared room's state has no row."""
        self._version += 1
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

    def _rows(self, rooms: np.ndarray, key: bytes) -> tuple[np.ndarray, np.ndarray, bool]:
        """Rows of ``rooms`` (whose bytes are ``key``) and which are known (lock held)."""
        self._index()
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
                self._version += 1

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
        key = rooms.tobytes()
        with self.lock:
            if injected is None and now >= self._latest_ready:
                last = self._answer
                if last is not None and last[1] == self._version and last[0] == key:
                    return PollResult(last[2].copy(), dict(last[3]))
            failures: dict[int, str] = {}
            if injected is not None:
                for room in rooms.tolist():
                    state = self.rooms.get(room)
                    if state is not None and (reason := injected(room)):
                        state.fail(reason)
                        self._sync(state)
            rows, known, every = self._rows(rooms, key)
            statuses = self._status[rows]
            if not every:
                statuses[~known] = KVPoll.Failed
            if now < self._latest_ready:
                held = (statuses != KVPoll.Failed) & (now < self._ready_at[rows])
                statuses[held & known] = KVPoll.Bootstrapping
            if not statuses.all():  # Failed is 0: reasons only when something failed
                for i in (statuses == KVPoll.Failed).nonzero()[0].tolist():
                    room = int(rooms[i])
                    state = self.rooms.get(room)
                    failures[room] = (
                        f"room {room} is unknown to {self.label}"
                        if state is None
                        else state.reason or "failed"
                    )
            if injected is None and now >= self._latest_ready:
                self._answer = (key, self._version, statuses.copy(), dict(failures))
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
