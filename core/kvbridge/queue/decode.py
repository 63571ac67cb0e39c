"""The decode side's pre-allocation and transfer queues, as a pure state machine.

No torch, sockets or clock in here: the driver passes in transport statuses, the current time
and the reduced vector, and executes the decisions that come back. Every decision is taken on
the *reduced* status vector, so ranks that see the same ``add`` calls and the same reduced
vectors make the same decisions (rule 1); local observations only lower a rank's own entry in
the vector before the MIN (rule 2).

Stages: ``PREALLOC`` (waiting for the prefill DP rank, connection and free memory) and
``TRANSFER`` (metadata sent, waiting for completion and the aux room stamp).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import attrs
import numpy as np

from kvbridge.queue.columns import (
    BOOTSTRAPPING,
    FAILED,
    NEVER,
    SUCCESS,
    TRANSFERRING,
    WAITING,
    Columns,
)
from kvbridge.queue.outcomes import Aborted, Committed, DecodeStep

# Stage values are chosen so that ``key = reduced + stage`` tells every decision apart with one
# add: 2..4 = pre-allocation and initialised everywhere (ready to allocate), 12 = transfer and
# Success everywhere (commit). Statuses are 0..4, so the two ranges never overlap.
PREALLOC = np.uint8(0)
TRANSFER = np.uint8(8)
_COMMIT_KEY = int(TRANSFER) + 4
FROM_OTHER_RANK = "failed on another rank"


class PageAllocator(Protocol):
    """What the decode queue needs from the engine's KV page allocator."""

    def can_alloc(self, count: int) -> bool: ...

    def alloc(self, count: int) -> np.ndarray | None: ...

    def free(self, indices: np.ndarray) -> None: ...


@attrs.frozen
class DecodeRequest:
    """A request the engine hands to kvbridge on every decode rank, in the same order."""

    room: int
    num_pages: int
    bootstrap_addr: str = ""
    #: Known when the router already chose the prefill DP rank.
    prefill_dp_rank: int | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 < self.room < 2**64:
            raise ValueError(f"room must be in 1..2**64-1 (0 is reserved), got {self.room}")
        if self.num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {self.num_pages}")


@attrs.frozen(eq=False)
class MetadataToSend:
    """Decision: pages and an aux slot were allocated; tell the prefill where to write."""

    room: int
    pages: np.ndarray
    aux_slot: int


@attrs.frozen
class DecodeDecisions:
    send_metadata: tuple[MetadataToSend, ...] = ()
    step: DecodeStep = attrs.field(factory=DecodeStep)

    @property
    def finished(self) -> tuple[int, ...]:
        return tuple(c.room for c in self.step.committed) + tuple(a.room for a in self.step.aborted)


class DecodeQueue:
    """One decode rank's queues. Identical on every rank of the TP group by construction."""

    def __init__(
        self,
        pages: PageAllocator,
        aux_slots: PageAllocator,
        aux: np.ndarray,
        *,
        bootstrap_timeout: float,
        waiting_timeout: float,
    ) -> None:
        self.pages = pages
        self.aux_slots = aux_slots
        self.aux = aux  # structured aux rows; the "room" column is the stamp
        self.stamps = aux["room"]
        self.bootstrap_timeout = bootstrap_timeout
        self.waiting_timeout = waiting_timeout
        self.cols = Columns()
        self.requests: dict[int, DecodeRequest] = {}
        self.allocated: dict[int, np.ndarray] = {}
        self.reasons: dict[int, str] = {}
        self.required: dict[int, int] = {}
        self.completions: dict[int, set[object]] = {}
        self._locally_complete: set[int] = set()  # rooms the gate must look at

    def __len__(self) -> int:
        return len(self.cols)

    @property
    def rooms(self) -> np.ndarray:
        return self.cols.rooms

    # -- membership: the only two ways it changes are add() and apply() ------------------------

    def add(self, requests: Sequence[DecodeRequest], now: float) -> None:
        """Enqueue requests; call with the same requests in the same order on every rank."""
        seen = set()
        for r in requests:
            if r.room in self.requests or r.room in seen:
                raise ValueError(f"room {r.room} is already queued")
            seen.add(r.room)
        for r in requests:
            self.requests[r.room] = r
        self.cols.append([r.room for r in requests], BOOTSTRAPPING, now + self.bootstrap_timeout)

    # -- local observations --------------------------------------------------------------------

    def initialised(self, room: int, required_completions: int) -> None:
        """This rank resolved the prefill DP rank and started the transport's init."""
        i = self.cols.index_of(room)
        if i is None or self.cols.local[i] == FAILED:
            return
        self.required[room] = required_completions
        self.cols.local[i] = max(self.cols.local[i], WAITING)
        self.cols.deadline[i] = NEVER  # waiting for memory is not a failure

    def fail(self, room: int, reason: str) -> None:
        """A local failure (resolution, transport, control channel, liveness)."""
        i = self.cols.index_of(room)
        if i is None or self.cols.local[i] == FAILED:
            return  # unknown (late report for a finished room) or already failed: first wins
        self.cols.local[i] = FAILED
        self.reasons[room] = reason

    def completed(self, room: int, sender: object) -> None:
        """A prefill rank reported its writes for ``room`` done; duplicates count once."""
        i = self.cols.index_of(room)
        if i is None or self.cols.stage[i] != TRANSFER:
            return
        done = self.completions.setdefault(room, set())
        done.add(sender)
        if len(done) >= self.required.get(room, 1) and self.cols.local[i] != FAILED:
            self.cols.local[i] = SUCCESS
            self._locally_complete.add(room)

    # -- one step ------------------------------------------------------------------------------

    def local_statuses(
        self, transport: np.ndarray, failures: Mapping[int, str], now: float
    ) -> np.ndarray:
        """This rank's status vector for the MIN, in queue order.

        ``transport`` holds the receiver poll for :attr:`rooms`; ``failures`` its reasons.
        """
        cols = self.cols
        for room, reason in failures.items():
            self.fail(room, reason)
        # In the transfer stage completion is the protocol's call; the transport may only object.
        v = np.minimum(cols.local, np.maximum(transport, cols.floor))
        if not transport.all():
            v[transport == FAILED] = FAILED
        done = np.flatnonzero(v == SUCCESS) if self._locally_complete else ()
        if len(done):
            # The metadata gate: a completion only counts once the room stamp landed.
            stamps = self.stamps[cols.slot[done]]
            rooms = cols.rooms[done]
            v[done[stamps == 0]] = TRANSFERRING
            wrong = done[(stamps != 0) & (stamps != rooms)]
            for i in wrong.tolist():
                self.fail(
                    int(cols.rooms[i]),
                    f"aux slot {int(cols.slot[i])} holds room stamp "
                    f"{int(self.stamps[cols.slot[i]])}",
                )
                v[i] = FAILED
        late = cols.overdue(now)
        if late is not None:
            for i in late.tolist():
                if v[i] != SUCCESS and v[i] != FAILED:
                    self.fail(int(cols.rooms[i]), self._timeout_reason(i))
                    v[i] = FAILED
        return v

    def _timeout_reason(self, i: int) -> str:
        cols = self.cols
        if cols.stage[i] == PREALLOC:
            return (
                f"timed out after {self.bootstrap_timeout:g}s resolving or connecting to "
                f"the prefill"
            )
        room = int(cols.rooms[i])
        done = len(self.completions.get(room, ()))
        if done >= self.required.get(room, 1):
            return (
                f"transfer reported complete but room stamp still "
                f"{int(self.stamps[cols.slot[i]])} in aux slot {int(cols.slot[i])} after "
                f"waiting_timeout {self.waiting_timeout:g}s"
            )
        return (
            f"transfer not complete after waiting_timeout {self.waiting_timeout:g}s "
            f"({done} of {self.required.get(room, 1)} prefill ranks done)"
        )

    def apply(self, reduced: np.ndarray, now: float) -> DecodeDecisions:
        """Act on the reduced vector: identical input on every rank gives identical output."""
        cols = self.cols
        if len(reduced) != len(cols):
            raise ValueError(f"reduced vector has {len(reduced)} entries for {len(cols)} rooms")
        aborted: list[Aborted] = []
        committed: list[Committed] = []
        to_send: list[MetadataToSend] = []
        remove: list[int] = []
        key = reduced + cols.stage

        # Cheap whole-vector checks first: in a steady state nothing is failed or complete.
        if len(reduced) and reduced.min() == FAILED:
            for i in np.flatnonzero(reduced == FAILED).tolist():
                aborted.append(self._abort(i))
                remove.append(i)

        commits = (
            np.flatnonzero(key == _COMMIT_KEY)
            if len(key) and key.max() == _COMMIT_KEY
            else np.zeros(0, dtype=np.int64)
        )
        for i in commits.tolist():
            room, slot = int(cols.rooms[i]), int(cols.slot[i])
            stamp = int(self.stamps[slot])
            if stamp != room:  # unreachable while the gate holds; never retry, never diverge
                self.reasons.setdefault(room, f"room stamp {stamp} at commit (aux slot {slot})")
                aborted.append(self._abort(i))
            else:
                row = self.aux[slot].copy()
                pages = self.allocated.pop(room)
                self.aux_slots.free(np.array([slot]))
                committed.append(Committed(room, pages, row))
                self._forget(room)
            remove.append(i)

        # key in 2..4, tested with one wrapping uint8 subtraction and one comparison.
        is_ready = (key - np.uint8(WAITING)) <= np.uint8(SUCCESS - WAITING)
        first = int(is_ready.argmax()) if len(key) else 0
        ready = np.zeros(0, dtype=np.int64)
        # Usually the head of the line does not fit and nothing else needs looking at.
        if (
            len(key)
            and is_ready[first]
            and self.pages.can_alloc(self.requests[int(cols.rooms[first])].num_pages)
        ):
            ready = np.flatnonzero(is_ready)
        for k in range(len(ready)):
            i = int(ready[k])
            room = int(cols.rooms[i])
            new_pages = self.pages.alloc(self.requests[room].num_pages)
            if new_pages is None:
                break  # FIFO: nobody overtakes the first request that does not fit
            slots = self.aux_slots.alloc(1)
            if slots is None:
                self.pages.free(new_pages)
                break
            self.allocated[room] = new_pages
            cols.stage[i] = TRANSFER
            cols.floor[i] = SUCCESS
            cols.slot[i] = int(slots[0])
            if cols.local[i] != FAILED:
                cols.local[i] = TRANSFERRING
            cols.set_deadline(i, now + self.waiting_timeout)
            to_send.append(MetadataToSend(room, new_pages, int(slots[0])))

        if remove:
            keep = np.ones(len(cols), dtype=bool)
            keep[remove] = False
            cols.keep(keep)
        return DecodeDecisions(tuple(to_send), DecodeStep(tuple(committed), tuple(aborted)))

    def _abort(self, i: int) -> Aborted:
        cols = self.cols
        room = int(cols.rooms[i])
        own = self.reasons.get(room)
        if cols.slot[i] >= 0:
            self.aux_slots.free(np.array([cols.slot[i]]))
        pages = self.allocated.pop(room, None)
        if pages is not None:
            self.pages.free(pages)
        self._forget(room)
        return Aborted(room, own or FROM_OTHER_RANK, from_other_rank=own is None)

    def _forget(self, room: int) -> None:
        self.requests.pop(room, None)
        self.reasons.pop(room, None)
        self.required.pop(room, None)
        self.completions.pop(room, None)
        self._locally_complete.discard(room)

    def pending_reasons(self, rooms: Iterable[int]) -> dict[int, str]:
        return {r: self.reasons[r] for r in rooms if r in self.reasons}
