"""The decode machine: pre-allocation, transfer and fenced queues, pure.

The driver passes in transport statuses, the current time and the reduced vector, and
performs the decisions that come back. It decides, for decode, the README's rules 1, 2, 5 and
6 (the gated queues and the metadata gate), rule 8's decode half (which rooms are fenced, who
must still confirm, whether a dead writer's silence lifts the fence: ``one_sided_writes``,
when the memory is released) and rule 9 for prefill's reports (``Standing.ROOM_WRITER``: the
writers named by :meth:`DecodeQueue.initialised`); and which rooms hold a lease while they
wait for memory.

Stages: ``PREALLOC`` (waiting for the prefill DP rank, connection and free memory),
``TRANSFER`` (metadata sent, waiting for completion and the aux room stamp) and ``FENCED``
(aborted after its metadata went out, until its writers are quiet).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

import attrs
import numpy as np

from kvbridge.protocol.columns import (
    BOOTSTRAPPING,
    FAILED,
    NEVER,
    SUCCESS,
    TRANSFERRING,
    WAITING,
    Columns,
)
from kvbridge.protocol.messages import AbortAck, Message, Status
from kvbridge.protocol.outcomes import FROM_OTHER_RANK, Aborted, Committed, DecodeStep, LateCause
from kvbridge.protocol.plan import PrefillTarget

M = TypeVar("M")

# Stage values are chosen so that ``key = reduced + stage`` tells every decision apart with one
# add: 2..4 = pre-allocation and initialised everywhere (ready to allocate), 12 = transfer and
# Success everywhere (commit), 20 = fenced and released everywhere. Statuses are 0..4, so the
# ranges never overlap.
PREALLOC = np.uint8(0)
TRANSFER = np.uint8(8)
FENCED = np.uint8(16)
_COMMIT_KEY = int(TRANSFER) + 4
_RELEASE_KEY = int(FENCED) + 4
#: Keys that ask :meth:`DecodeQueue.apply` for a decision: any failure (reduced 0: keys 0, 8
#: and 16), a commit, a release, and rooms ready to allocate (2..4). In a steady state (rooms
#: transferring, or fenced and still written) no room has one, and one table look-up says so.
_ACTS = np.zeros(256, dtype=bool)
_ACTS[[int(PREALLOC), int(TRANSFER), int(FENCED), _COMMIT_KEY, _RELEASE_KEY, 2, 3, 4]] = True
#: ``stage + local`` of a room in transfer whose completion this rank still waits for (one
#: sum tells it apart: stages are 0, 8, 16 and statuses 0..4).
_AWAITING = int(TRANSFER) + int(TRANSFERRING)
#: How many rooms aborted "from another rank" are remembered for a root cause arriving late.
MAX_FOLLOWED = 4096


class PageAllocator(Protocol):
    """What the decode queue needs from the engine's KV page allocator."""

    def can_alloc(self, count: int) -> bool: ...

    def alloc(self, count: int) -> np.ndarray | None: ...

    def free(self, indices: np.ndarray) -> None: ...


class SlotAllocator(PageAllocator, Protocol):
    """What the decode queue needs from its aux-slot pool (:class:`~kvbridge.AuxSlotPool`):
    a room holds one slot, freed on its own."""

    def free_one(self, index: int) -> None: ...


@attrs.frozen
class DecodeRequest:
    """A request the engine hands to kvbridge on every decode rank, in the same order."""

    room: int
    num_pages: int
    bootstrap_addr: str = ""
    #: Known when the router already chose the prefill DP rank.
    prefill_dp_rank: int | None = None
    #: Pages the engine already allocated for this request (its own allocator: vLLM, SGLang).
    #: kvbridge writes into them but never frees them: ``DecodeStep.released`` says when they
    #: are safe to reuse after an abort (the fence). None: kvbridge allocates ``num_pages``.
    pages: np.ndarray | None = attrs.field(default=None, eq=False, hash=False)

    def __attrs_post_init__(self) -> None:
        if not 0 < self.room < 2**64:
            raise ValueError(f"room must be in 1..2**64-1 (0 is reserved), got {self.room}")
        if self.num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {self.num_pages}")
        if self.pages is not None:
            pages = np.ascontiguousarray(self.pages, dtype=np.int64).reshape(-1)
            if len(pages) != self.num_pages:
                raise ValueError(
                    f"room {self.room}: num_pages is {self.num_pages} but {len(pages)} engine "
                    f"pages were given"
                )
            if len(pages) and pages.min() < 0:
                raise ValueError(f"room {self.room}: negative page index")
            object.__setattr__(self, "pages", pages)

    @property
    def engine_owned(self) -> bool:
        return self.pages is not None


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
    #: Committed rooms whose stamp on this rank no longer named them at the commit: something
    #: wrote the aux slot after this rank's gate passed (a write past the fence). They commit
    #: like on every other rank, with the row the gate checked; the driver reports them.
    stamp_moved: tuple[int, ...] = ()

    @property
    def finished(self) -> tuple[int, ...]:
        return tuple(c.room for c in self.step.committed) + tuple(a.room for a in self.step.aborted)


_NOTHING = DecodeDecisions()


@attrs.frozen
class AbortNotice:
    """Decision: tell the prefill that ``room`` aborted on this decode rank (rule 7).

    ``cause`` None: this rank only followed another rank's failure, so nothing it says may
    pass for the root cause. ``target``: the resolved room's prefill ranks (its plan); None
    while unresolved, when every prefill rank at ``bootstrap_addr`` hears it instead (the room
    may already wait there, early), once this rank has that address's bootstrap answer."""

    room: int
    cause: str | None
    target: PrefillTarget | None
    bootstrap_addr: str = ""


def abort_notice(
    failed: Aborted, target: PrefillTarget | None, bootstrap_addr: str
) -> AbortNotice | None:
    """Who hears of ``failed`` and with what cause; None: nobody can be waiting on it (never
    resolved and no bootstrap address known)."""
    cause = None if failed.from_other_rank else failed.reason
    if target is not None:
        return AbortNotice(failed.room, cause, target)
    if bootstrap_addr:
        return AbortNotice(failed.room, cause, None, bootstrap_addr)
    return None


#: Most aborts held at once for prefills whose bootstrap answer has not come (see
#: :class:`HeldAborts`): clients choose bootstrap addresses, so the hold is bounded.
MAX_HELD_ABORTS = 1024


@attrs.frozen
class HeldRelease(Generic[M]):
    """What :meth:`HeldAborts.release` decided: aborts to send now, per prefill address, and
    how many were given up per address (no answer within the hold)."""

    send: tuple[tuple[str, tuple[M, ...]], ...] = ()
    dropped: tuple[tuple[str, int], ...] = ()


class HeldAborts(Generic[M]):
    """Aborts for prefills this rank cannot reach yet: decode gave up on a room before it had
    the prefill's bootstrap answer (the first request to a new prefill, failed at once).

    The prefill may hold the room already (a router sends both legs at once), so an abort
    waits for the answer as long as that prefill would wait for decode itself (``timeout``:
    ``bootstrap_timeout``), at most ``limit`` at once, instead of being dropped and leaving
    the room there until that timeout. The caller owns the look-ups and the sending.
    """

    def __init__(self, timeout: float, limit: int = MAX_HELD_ABORTS) -> None:
        self.timeout = timeout
        self.limit = limit
        self._held: dict[str, list[tuple[float, M]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def addresses(self) -> list[str]:
        """The prefill addresses aborts wait on."""
        return list(self._held)

    def hold(self, addr: str, message: M, now: float) -> bool:
        """Hold ``message`` for ``addr``'s answer; False: the hold is full, it is not held."""
        if self._count >= self.limit:
            return False
        self._held.setdefault(addr, []).append((now + self.timeout, message))
        self._count += 1
        return True

    def release(self, answered: Collection[str], now: float) -> HeldRelease[M]:
        """``answered``: the held addresses whose bootstrap answer this rank has now. Their
        aborts go out; aborts still waiting past their hold are given up."""
        send: list[tuple[str, tuple[M, ...]]] = []
        dropped: list[tuple[str, int]] = []
        for addr in list(self._held):
            held = self._held[addr]
            if addr in answered:
                send.append((addr, tuple(message for _, message in held)))
                kept: list[tuple[float, M]] = []
            else:
                kept = [(give_up, message) for give_up, message in held if now < give_up]
                if len(kept) < len(held):
                    dropped.append((addr, len(held) - len(kept)))
            self._count -= len(held) - len(kept)
            if kept:
                self._held[addr] = kept
            else:
                del self._held[addr]
        return HeldRelease(tuple(send), tuple(dropped))


class DecodeQueue:
    """One decode rank's queues. Identical on every rank of the TP group by construction."""

    def __init__(
        self,
        pages: PageAllocator | None,
        aux_slots: SlotAllocator,
        aux: np.ndarray,
        *,
        bootstrap_timeout: float,
        waiting_timeout: float,
        fence_timeout: float = 60.0,
        stamp_completes: bool = True,
        one_sided_writes: bool = False,
        keep_checksums: bool = False,
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
        #: The aux row of each room as its last gate saw it (stamp naming the room): what a
        #: commit hands out, so the commit needs nothing but the reduced vector.
        self._gated: dict[int, np.void] = {}
        self.fence_timeout = fence_timeout
        #: A room with one writer is complete here once its stamp landed: the contract has
        #: a writer's bytes land in send order with the aux row last, so the stamp proves
        #: the rest. Saves waiting for the prefill's next step and its completion message.
        self.stamp_completes = stamp_completes
        #: Writes the receiver cannot refuse (RDMA): a writer declared dead may be only
        #: partitioned and finish a write later, so its silence does not lift the fence; only
        #: its acknowledgement or its replacement does (:meth:`writer_replaced`). A receiver
        #: that refuses writes for rooms it dropped (the Fake) lifts it on the declaration.
        self.one_sided_writes = one_sided_writes
        #: Checksums from each room's writers (``verify_checksums``), by room and writer.
        self.checksums: dict[int, dict[object, int]] | None = {} if keep_checksums else None
        #: The prefill ranks that write each room into this rank (None: not checked).
        self.writers: dict[int, frozenset[object] | None] = {}
        #: Writers that said they will write no more: all done, abort acknowledged, or dead.
        self.quiet: dict[int, set[object]] = {}
        #: Writers declared dead whose silence does not lift the fence (see writer_dead).
        self.dead: dict[int, set[object]] = {}
        #: Fenced rooms and when they were fenced.
        self.fenced: dict[int, float] = {}
        self._fence_warned: set[int] = set()
        #: Completions, failures and acknowledgements from senders outside the room's plan.
        self.untrusted = 0
        #: Rooms aborted here only because another rank failed, with the writers that may
        #: still name the root cause (rule 7); oldest first, at most ``MAX_FOLLOWED``.
        self._followed: dict[int, frozenset[object] | None] = {}
        #: Root causes that arrived after their room's abort, not yet handed out.
        self._late: list[LateCause] = []

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
            if r.room in self.fenced:
                raise ValueError(
                    f"room {r.room} is still fenced: its abort has not been acknowledged by "
                    f"every prefill rank that may write it; use a new room"
                )
            if r.room in self.requests or r.room in seen:
                raise ValueError(f"room {r.room} is already queued")
            seen.add(r.room)
        for r in requests:
            self.requests[r.room] = r
            self._followed.pop(r.room, None)  # a new life for the room number
        self.cols.append([r.room for r in requests], BOOTSTRAPPING, now + self.bootstrap_timeout)
        capacity = getattr(self.pages, "capacity", None)
        for r in requests:
            if self.pages is None and not r.engine_owned:
                self.fail(r.room, "no page allocator: this request must bring its engine pages")
        if capacity is not None:
            for r in requests:
                if not r.engine_owned and r.num_pages > capacity:
                    # It could never be allocated and, FIFO, would block every later request.
                    self.fail(
                        r.room,
                        f"request needs {r.num_pages} pages but the decode page pool holds "
                        f"only {capacity}",
                    )

    # -- local observations --------------------------------------------------------------------

    def initialised(
        self,
        room: int,
        required_completions: int,
        writers: Collection[object] | None = None,
    ) -> None:
        """This rank resolved the prefill DP rank and started the transport's init.

        ``writers`` names the prefill ranks that write ``room`` into this rank: only they may
        complete, fail or release it. None accepts any sender (in-process tests only).
        """
        i = self.cols.index_of(room)
        if i is None or self.cols.local[i] == FAILED:
            return
        self.required[room] = required_completions
        self.writers[room] = frozenset(writers) if writers is not None else None
        self.cols.local[i] = max(self.cols.local[i], WAITING)
        self.cols.deadline[i] = NEVER  # waiting for memory is not a failure

    def fail(self, room: int, reason: str) -> None:
        """A local failure (resolution, transport, control channel, liveness).

        The first cause wins; a room failed only by a follow (:meth:`peer_failed` without a
        reason) has none yet, so a cause seen before the abort becomes its reason (rule 7).
        """
        i = self.cols.index_of(room)
        if i is None or room in self.reasons or self.cols.stage[i] == FENCED:
            return  # unknown (late report for a finished room) or already failed: first wins
        self.cols.local[i] = FAILED
        self.reasons[room] = reason

    def follow(self, room: int) -> None:
        """Fail ``room`` only because another rank failed it: no cause of this rank's own, so
        it ends here as "failed on another rank" and a root cause may still come (rule 7)."""
        i = self.cols.index_of(room)
        if i is not None and self.cols.stage[i] != FENCED:
            self.cols.local[i] = FAILED

    def _trusted(self, room: int, sender: object) -> bool:
        writers = self.writers.get(room, frozenset())
        if writers is None or sender in writers:
            return True
        self.untrusted += 1
        return False

    def receive(self, message: Message) -> bool:
        """A prefill rank's ``Status`` or ``AbortAck``; False (counted) when its sender does
        not write the room (``Standing.ROOM_WRITER``) or the message is not one for decode."""
        if isinstance(message, AbortAck):
            return self.acknowledged(message.room, message.prefill_key)
        if not isinstance(message, Status):
            self.untrusted += 1
            return False
        room, sender = message.room, message.prefill_key
        if message.checksum is not None and self.checksums is not None:
            writers = self.writers.get(room)
            if room in self.requests and (writers is None or sender in writers):
                self.checksums.setdefault(room, {})[sender] = message.checksum  # before done
        if message.ok:
            return self.completed(room, sender)
        return self.peer_failed(room, sender, message.cause)

    def address_lost(self, bootstrap_addr: str, reason: str) -> None:
        """A whole prefill address was declared lost: every room it serves fails, and its
        writers count as dead (see :meth:`writer_dead` for what that does to the fence)."""
        gone = [r for r, q in self.requests.items() if q.bootstrap_addr == bootstrap_addr]
        for room in gone:
            self.fail(room, reason)
        self.writers_gone(gone)

    def completed(self, room: int, sender: object) -> bool:
        """A prefill rank reported its writes for ``room`` done; duplicates count once.

        Returns False (and counts it) when ``sender`` is not one of the room's writers.
        """
        i = self.cols.index_of(room)
        if i is None:
            return True  # a late report for a room that ended: ignored, not hostile
        if not self._trusted(room, sender):
            return False
        self._quiet(room, i, sender)
        if self.cols.stage[i] != TRANSFER:
            return True
        done = self.completions.setdefault(room, set())
        done.add(sender)
        if len(done) >= self.required.get(room, 1) and self.cols.local[i] != FAILED:
            self.cols.local[i] = SUCCESS
            self._locally_complete.add(room)
        return True

    def peer_failed(self, room: int, sender: object, reason: str | None) -> bool:
        """A writer of ``room`` reported failure; False (counted) if it is not a writer.

        ``reason`` None: the writer only followed a failure elsewhere. The room fails here
        too, but this rank then reports "failed on another rank", not someone's echo.
        """
        i = self.cols.index_of(room)
        if i is None:
            if reason is not None and room in self._followed:
                return self._late_cause(room, sender, reason)
            return True
        if not self._trusted(room, sender):
            return False
        if reason is not None and self.cols.stage[i] == FENCED:
            if room in self._followed:
                self._late_cause(room, sender, reason)
        elif reason is not None:
            self.fail(room, reason)
        else:
            self.follow(room)
        return True

    def _late_cause(self, room: int, sender: object, reason: str) -> bool:
        """A writer's root cause for a room aborted here as "failed on another rank"."""
        writers = self._followed[room]
        if writers is not None and sender not in writers:
            self.untrusted += 1
            return False
        del self._followed[room]  # the first cause wins; one per room
        self._late.append(LateCause(room, reason))
        return True

    def take_late_causes(self) -> tuple[LateCause, ...]:
        """Root causes that arrived after their room aborted here, each once (rule 7)."""
        late, self._late = tuple(self._late), []
        return late

    def acknowledged(self, room: int, sender: object) -> bool:
        """A writer of ``room`` confirmed it will write no more into this rank's memory."""
        i = self.cols.index_of(room)
        if i is None:
            return True
        if not self._trusted(room, sender):
            return False
        self._quiet(room, i, sender)
        return True

    def writers_gone(self, rooms: Iterable[int]) -> None:
        """A whole prefill address was declared lost: as :meth:`writer_dead` for each writer."""
        for room in rooms:
            i = self.cols.index_of(room)
            writers = self.writers.get(room)
            if i is not None and writers:
                for w in writers:
                    self._declared_dead(room, i, w)

    def _declared_dead(self, room: int, i: int, writer: object) -> None:
        if self.one_sided_writes:
            self.dead.setdefault(room, set()).add(writer)
        else:
            self._quiet(room, i, writer)

    def writer_dead(self, writer: object, reason: str) -> list[int]:
        """Liveness declared ``writer`` dead: fail the rooms it writes or was to write.

        Its silence also counts as "will write no more", unless writes are
        ``one_sided_writes``: then the fence waits for its acknowledgement, or for
        :meth:`writer_replaced`. Returns the rooms whose metadata had gone out.
        """
        hit = [r for r in self._writing_rooms() if writer in self._still_to_hear(r)]
        # Rooms resolved to the dead writer that still wait for memory fail too: no metadata
        # went out, so nothing can write them, and waiting for memory has no deadline. Left
        # queued they would hold the head of the line (FIFO) for every other prefill's rooms.
        waiting = [
            r
            for r, writers in self.writers.items()
            if writers
            and writer in writers
            and (i := self.cols.index_of(r)) is not None
            and self.cols.stage[i] == PREALLOC
        ]
        for room in waiting:
            self.fail(room, reason)
        for room in hit:
            self.fail(room, reason)
            i = self.cols.index_of(room)
            if i is not None:
                self._declared_dead(room, i, writer)
        return hit

    def writer_replaced(self, room: int, writer: object) -> None:
        """A dead writer's process is known to be gone (its rank re-registered elsewhere)."""
        i = self.cols.index_of(room)
        if i is not None and writer in self.dead.get(room, ()):
            self._quiet(room, i, writer)

    def leases(self) -> list[int]:
        """Rooms resolved here that wait only for decode memory: their prefill should keep
        them (``Waiting`` renews their bootstrap deadline there, a lease)."""
        cols = self.cols
        waiting = cols.rooms[cols.stage == PREALLOC].tolist()
        return [r for r in waiting if r in self.writers]

    def writers_in_use(self) -> set[object]:
        """Writers this rank still waits on: metadata sent, not yet done or acknowledged."""
        out: set[object] = set()
        for room in self._writing_rooms():
            out |= self._still_to_hear(room)
        return out

    def _writing_rooms(self) -> list[int]:
        # Only after the metadata went out does a prefill rank know to send heartbeats.
        return [
            r
            for r in self.writers
            if (i := self.cols.index_of(r)) is not None and self.cols.stage[i] != PREALLOC
        ]

    def _still_to_hear(self, room: int) -> frozenset[object]:
        writers = self.writers.get(room) or frozenset()
        return writers - self.quiet.get(room, set()) - self.dead.get(room, set())

    def _quiet(self, room: int, i: int, sender: object) -> None:
        quiet = self.quiet.setdefault(room, set())
        quiet.add(sender)
        if self.cols.stage[i] == FENCED and not self._still_writing(room):
            self.cols.local[i] = SUCCESS  # released here; all ranks release on the MIN

    def _still_writing(self, room: int) -> bool:
        writers = self.writers.get(room)
        return bool(writers) and not writers <= self.quiet.get(room, set())  # type: ignore[operator]

    @property
    def fenced_pages(self) -> int:
        """Pages held by the abort fence on this rank."""
        return sum(len(self.allocated.get(room, ())) for room in self.fenced)

    def overdue_fences(self, now: float) -> list[int]:
        """Rooms fenced for longer than ``fence_timeout``, each reported once."""
        late = [
            r
            for r, since in self.fenced.items()
            if now - since > self.fence_timeout and r not in self._fence_warned
        ]
        self._fence_warned.update(late)
        return late

    def fence_waiting_for(self, room: int) -> list[object]:
        writers = self.writers.get(room) or frozenset()
        return sorted(writers - self.quiet.get(room, set()), key=repr)

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
        if self.stamp_completes:
            self._complete_by_stamp()
        # In the transfer stage completion is the protocol's call; the transport may only object.
        v = np.minimum(cols.local, np.maximum(transport, cols.floor))
        if not np.logical_and.reduce(transport):
            v[(transport == FAILED) & (cols.stage != FENCED)] = FAILED
        done = (v == SUCCESS).nonzero()[0] if self._locally_complete else ()
        if len(done):
            # The metadata gate: a completion only counts once the room stamp landed.
            stamps = self.stamps[cols.slot[done]]
            rooms = cols.rooms[done]
            v[done[stamps == 0]] = TRANSFERRING
            passed = done[(stamps == rooms) & (cols.stage[done] == TRANSFER)]
            if len(passed):
                rows = self.aux[cols.slot[passed]]  # a copy: later writes cannot change it
                for k, i in enumerate(passed.tolist()):
                    self._gated[int(cols.rooms[i])] = rows[k]
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
        if self.fenced:
            # A fenced room is Transferring until its writers are quiet here, then Success:
            # the MIN releases it on every rank in the same step.
            fenced = cols.stage == FENCED
            v[fenced] = cols.local[fenced]
        return v

    def _complete_by_stamp(self) -> None:
        cols = self.cols
        waiting = ((cols.stage + cols.local) == _AWAITING).nonzero()[0]
        if not len(waiting):
            return
        landed = waiting[self.stamps[cols.slot[waiting]] == cols.rooms[waiting]]
        for i in landed.tolist():
            room = int(cols.rooms[i])
            if self.required.get(room, 1) == 1:
                cols.local[i] = SUCCESS
                self._locally_complete.add(room)

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
        key = reduced + cols.stage
        if not _ACTS[key].any():
            return _NOTHING
        aborted: list[Aborted] = []
        committed: list[Committed] = []
        to_send: list[MetadataToSend] = []
        remove: list[int] = []

        # Cheap whole-vector checks first: in a steady state nothing is failed or complete.
        released: list[int] = []
        if len(reduced) and reduced.min() == FAILED:
            for i in (reduced == FAILED).nonzero()[0].tolist():
                failed, fenced = self._abort(i, now)
                aborted.append(failed)
                if not fenced:
                    remove.append(i)
                    released.append(failed.room)  # nothing can still be writing it

        if self.fenced and len(key) and key.max() == _RELEASE_KEY:
            for i in (key == _RELEASE_KEY).nonzero()[0].tolist():
                released.append(self._release(i))
                remove.append(i)

        # Not ``key.max() == _COMMIT_KEY``: a fenced room's key is higher, and while one waits
        # for its writers every other room would wait for it too.
        commits = (key == _COMMIT_KEY).nonzero()[0]
        moved: list[int] = []
        for i in commits.tolist():
            # Decided on the reduced vector alone (rule 1): every rank's gate passed this room
            # before the MIN, so every rank commits it. A stamp that changed since on this rank
            # is reported, never a rank-local abort; the row is the one the gate checked.
            room, slot = int(cols.rooms[i]), int(cols.slot[i])
            gated = self._gated.pop(room, None)
            row = gated if gated is not None else self.aux[slot].copy()
            if int(self.stamps[slot]) != room:
                moved.append(room)
            pages = self.allocated.pop(room)
            self.aux_slots.free_one(slot)
            committed.append(Committed(room, pages, row))
            self._forget(room)
            remove.append(i)

        # key in 2..4, tested with one wrapping uint8 subtraction and one comparison.
        is_ready = (key - np.uint8(WAITING)) <= np.uint8(SUCCESS - WAITING)
        first = int(is_ready.argmax()) if len(key) else 0
        ready = np.zeros(0, dtype=np.int64)
        # Usually the head of the line does not fit and nothing else needs looking at.
        if len(key) and is_ready[first] and self._fits(self.requests[int(cols.rooms[first])]):
            ready = is_ready.nonzero()[0]
        for k in range(len(ready)):
            i = int(ready[k])
            room = int(cols.rooms[i])
            request = self.requests[room]
            new_pages = self._alloc(request)
            if new_pages is None:
                break  # FIFO: nobody overtakes the first request that does not fit
            slots = self.aux_slots.alloc(1)
            if slots is None:
                self._return(request, new_pages)
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
        return DecodeDecisions(
            tuple(to_send),
            DecodeStep(tuple(committed), tuple(aborted), tuple(released)),
            tuple(moved),
        )

    def _abort(self, i: int, now: float) -> tuple[Aborted, bool]:
        """Abort row ``i``; returns the outcome and whether its memory went into the fence.

        Every rank takes the same branch: the stage is agreed, and so is whether the room has
        writers (the plan is the same on every rank; only who is quiet yet differs).
        """
        cols = self.cols
        room = int(cols.rooms[i])
        own = self.reasons.get(room)
        outcome = Aborted(room, own or FROM_OTHER_RANK, from_other_rank=own is None)
        if own is None:
            # A writer may still name the root cause after this step: keep who may (bounded).
            self._followed[room] = self.writers.get(room, frozenset())
            if len(self._followed) > MAX_FOLLOWED:
                del self._followed[next(iter(self._followed))]
        if cols.stage[i] == TRANSFER and self.writers.get(room):
            # Metadata went out: a prefill rank may still write these pages (rule 8).
            cols.stage[i] = FENCED
            cols.floor[i] = SUCCESS
            cols.local[i] = SUCCESS if not self._still_writing(room) else TRANSFERRING
            cols.deadline[i] = NEVER
            self.fenced[room] = now
            self.reasons.pop(room, None)
            self.completions.pop(room, None)
            if self.checksums is not None:
                self.checksums.pop(room, None)
            self._locally_complete.discard(room)
            self._gated.pop(room, None)
            return outcome, True
        self._free(i, room)
        self._forget(room)
        return outcome, False

    def _release(self, i: int) -> int:
        room = int(self.cols.rooms[i])
        self._free(i, room)
        self._forget(room)
        return room

    def _fits(self, request: DecodeRequest) -> bool:
        if request.engine_owned:
            return True
        return self.pages is not None and self.pages.can_alloc(request.num_pages)

    def _alloc(self, request: DecodeRequest) -> np.ndarray | None:
        if request.pages is not None:
            return request.pages
        return self.pages.alloc(request.num_pages) if self.pages is not None else None

    def _return(self, request: DecodeRequest, pages: np.ndarray) -> None:
        """Give pages back to kvbridge's allocator; the engine's own are never freed here."""
        if not request.engine_owned and self.pages is not None:
            self.pages.free(pages)

    def _free(self, i: int, room: int) -> None:
        cols = self.cols
        if cols.slot[i] >= 0:
            self.aux_slots.free_one(int(cols.slot[i]))
        pages = self.allocated.pop(room, None)
        request = self.requests.get(room)
        if pages is not None and request is not None:
            self._return(request, pages)

    def _forget(self, room: int) -> None:
        if self.checksums is not None:
            self.checksums.pop(room, None)
        self.requests.pop(room, None)
        self.reasons.pop(room, None)
        self.required.pop(room, None)
        self.completions.pop(room, None)
        self.writers.pop(room, None)
        self.quiet.pop(room, None)
        self.dead.pop(room, None)
        self.fenced.pop(room, None)
        self._fence_warned.discard(room)
        self._locally_complete.discard(room)
        self._gated.pop(room, None)

    def pending_reasons(self, rooms: Iterable[int]) -> dict[int, str]:
        return {r: self.reasons[r] for r in rooms if r in self.reasons}
