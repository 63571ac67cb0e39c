"""A decode rank's session (see :mod:`kvbridge.runtime` for how a step runs).

Its prepare hands the prefill ranks' messages to :class:`~kvbridge.protocol.decode.DecodeQueue`
(which decides trust and the fence) and heartbeats to the writers' liveness, declares silent
writers dead, resolves prefill targets, renews memory leases and polls the receivers; its
finish sends metadata and aborts and releases fenced memory.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import attrs
import numpy as np

from kvbridge.config import TransferConfig
from kvbridge.memory import AuxSlotPool
from kvbridge.observe import ObserverRelay
from kvbridge.protocol.columns import FAILED, SUCCESS
from kvbridge.protocol.decode import (
    FENCED,
    DecodeQueue,
    DecodeRequest,
    PageAllocator,
    abort_notice,
)
from kvbridge.protocol.liveness import WriterLiveness
from kvbridge.protocol.messages import AbortAck, Heartbeat, Message, Status, sender_of
from kvbridge.protocol.outcomes import DecodeStep, LateCause
from kvbridge.protocol.plan import PrefillTarget
from kvbridge.ratelimit import ThrottledWarning
from kvbridge.runtime.collective import Reducer
from kvbridge.runtime.wiring import (
    AbortSink,
    Clock,
    MetadataSink,
    PrefillDirectory,
    Verifier,
    log_abort,
    report_late_causes,
)
from kvbridge.status import KVPoll
from kvbridge.transport.facade import TransportManager
from kvbridge.types import Role

log = logging.getLogger("kvbridge")


class DecodeSession:
    """One decode rank's side of kvbridge, driven by the engine's scheduler loop."""

    def __init__(
        self,
        *,
        config: TransferConfig,
        manager: TransportManager,
        pages: PageAllocator | None,
        aux: np.ndarray,
        reducer: Reducer,
        directory: PrefillDirectory,
        send_metadata: MetadataSink,
        send_abort: AbortSink | None = None,
        on_writer_dead: Callable[[object], None] | None = None,
        send_waiting: Callable[[Sequence[tuple[int, PrefillTarget]]], None] | None = None,
        verify: Verifier | None = None,
        aux_slots: AuxSlotPool | None = None,
        clock: Clock = time.monotonic,
        observers: ObserverRelay | None = None,
        page_bytes: int = 0,
    ) -> None:
        self.manager = manager
        self.reducer = reducer
        self.directory = directory
        #: Bytes one page occupies over every KV region of this rank (for observers).
        self.page_bytes = page_bytes
        self._since: dict[int, float] = {}  # observers only: room -> add, then metadata time
        self.send_metadata = send_metadata
        self.send_abort = send_abort
        self.clock = clock
        self.observers = observers or ObserverRelay()
        self.aux_slots = aux_slots or AuxSlotPool(aux["room"])
        self.queue = DecodeQueue(
            pages,
            self.aux_slots,
            aux,
            bootstrap_timeout=config.bootstrap_timeout,
            waiting_timeout=config.waiting_timeout,
            fence_timeout=config.fence_timeout,
            # A checksum arrives with the completion message: then wait for it.
            stamp_completes=verify is None,
            keep_checksums=verify is not None,
            one_sided_writes=_one_sided(manager),
        )
        self._unresolved: list[DecodeRequest] = []
        self._targets: dict[int, PrefillTarget] = {}
        #: Fences that outlived ``fence_timeout`` (logged once each; the memory stays held).
        self.fence_overdue = 0
        #: Commits whose aux slot this rank saw written again after its gate passed.
        self.stamp_moved = 0
        self.liveness = WriterLiveness(config.heartbeat_interval, config.heartbeat_max_misses)
        self._fence_plans: dict[int, PrefillTarget] = {}
        self.verify = verify
        self.on_writer_dead = on_writer_dead
        self.send_waiting = send_waiting
        self._lease_every = config.heartbeat_interval
        self._next_lease = 0.0
        self._addr_of: dict[int, str] = {}
        self._verified: set[int] = set()
        #: AbortAck messages received (from any sender).
        self.abort_acks = 0
        self._warn_untrusted = ThrottledWarning(log, "untrusted prefill reports ignored")
        self._inbox: collections.deque[Message] = collections.deque()
        self._refused: collections.deque[Message] = collections.deque()
        self._lost: collections.deque[tuple[str, str]] = collections.deque()

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, requests: Sequence[DecodeRequest]) -> None:
        """Enqueue requests; the same ones, in the same order, on every rank of the group."""
        now = self.clock()
        self.queue.add(requests, now)
        if self.observers.active:
            self._since.update((r.room, now) for r in requests)
        for r in requests:
            self.manager.receiver_construct(r.room)
            self._addr_of[r.room] = r.bootstrap_addr
        self._unresolved.extend(requests)

    def receive(self, message: Message) -> None:
        """A control message from a prefill rank (its role already checked). Thread-safe."""
        self._inbox.append(message)

    def refuse(self, message: Message) -> None:
        """A control message this role never receives (``WHO_MAY_SEND``). Thread-safe."""
        self._refused.append(message)

    def notify_done(
        self,
        room: int,
        sender: str,
        ok: bool = True,
        reason: str | None = None,
        checksum: int | None = None,
        root: bool = True,
    ) -> None:
        """A prefill rank finished (or failed) its writes for ``room``. Thread-safe.

        ``root`` False: the prefill rank failed only because another prefill rank did.
        """
        self.receive(Status(room, sender, ok, reason, checksum, root))

    def abort(self, room: int, reason: str, *, follows: bool = False) -> None:
        """The engine gives up on ``room`` (client gone, request cancelled). Scheduler thread.

        A local observation like any other (rule 2): the room aborts on every rank at the next
        reduction, the prefill is told (also before resolution), and its pages follow the fence.
        An unknown or already ended room is ignored. ``follows``: see ``DecodeNode.abort``.
        """
        if follows:
            log.debug("decode room %d: the engine follows another rank: %s", room, reason)
            self.queue.follow(room)
        else:
            self.queue.fail(room, reason)

    def notify_heartbeat(self, sender: str) -> None:
        """A prefill rank said it is alive. Thread-safe."""
        self.receive(Heartbeat(sender))

    def notify_ack(self, room: int, sender: str) -> None:
        """A prefill rank confirmed it will write ``room`` no more (abort fence). Thread-safe."""
        self.receive(AbortAck(room, sender))

    @property
    def untrusted(self) -> int:
        """Reports dropped because their sender is not a writer of the room (rule 9)."""
        return self.queue.untrusted

    @property
    def fenced_pages(self) -> int:
        return self.queue.fenced_pages

    def fail_address(self, bootstrap_addr: str, reason: str) -> None:
        """Liveness: fail every queued room served by ``bootstrap_addr``. Thread-safe."""
        self._lost.append((bootstrap_addr, reason))

    def step(self) -> DecodeStep:
        local = self.prepare()
        reduced = self.reducer(local, self.queue.rooms) if len(local) else local
        return self.finish(reduced)

    def prepare(self) -> np.ndarray:
        queue = self.queue
        while self._lost:  # a whole prefill address is gone: its writers are dead
            queue.address_lost(*self._lost.popleft())
        now = self.clock()
        self.liveness.looking(now)
        while self._refused:
            message = self._refused.popleft()
            queue.untrusted += 1
            self._warn_untrusted(
                now, "ignored a %s control message on a decode rank", type(message).__name__
            )
        while self._inbox:
            message = self._inbox.popleft()
            if isinstance(message, Heartbeat):
                self.liveness.heard(message.prefill_key, now)
                continue
            if isinstance(message, AbortAck):
                self.abort_acks += 1
            if not queue.receive(message):
                self._warn_untrusted(
                    now,
                    "ignored a %s for room %d from %r: not a prefill rank that writes it",
                    type(message).__name__,
                    getattr(message, "room", 0),
                    sender_of(message),
                )
        self._warn_untrusted.flush(now)
        if self.liveness.due(now):  # writers_in_use() is a loop over rooms: only when due
            for writer in self.liveness.dead(now, queue.writers_in_use()):
                reason = (
                    f"lost connection to prefill {writer} (no heartbeat for "
                    f"{self.liveness.limit:g}s)"
                )
                rooms = queue.writer_dead(writer, reason)
                if self.on_writer_dead is not None:
                    self.on_writer_dead(writer)
                log.warning("%s; failing %d rooms", reason, len(rooms))
        if self._unresolved:
            self._resolve()
        if not len(queue):
            return np.zeros(0, dtype=np.uint8)
        if self.send_waiting is not None and now >= self._next_lease:
            self._next_lease = now + self._lease_every
            self._renew_leases()
        if queue.fenced:
            for room in queue.overdue_fences(now):
                log.warning(
                    "room %d: fenced for over %gs, still waiting for %s to confirm they stopped "
                    "writing; its %d pages stay quarantined",
                    room,
                    queue.fence_timeout,
                    ", ".join(map(str, queue.fence_waiting_for(room))),
                    len(queue.allocated.get(room, ())),
                )
                self.fence_overdue += 1
            live = queue.cols.stage != FENCED
            statuses = np.full(len(queue), SUCCESS, dtype=np.uint8)
            statuses[live], failures = self.manager.receiver_poll(queue.rooms[live])
        else:
            statuses, failures = self.manager.receiver_poll(queue.rooms)
        local = queue.local_statuses(statuses, failures, now)
        if self.verify is not None:
            self._verify(local)
        return local

    def dead_writers(self) -> list[tuple[int, object, PrefillTarget]]:
        """Fenced rooms waiting on a writer declared dead: (room, writer, the room's plan)."""
        return [
            (room, writer, self._fence_plans[room])
            for room, writers in self.queue.dead.items()
            if room in self._fence_plans
            for writer in writers
        ]

    def writer_replaced(self, room: int, writer: object) -> None:
        """Scheduler thread: ``writer``'s rank re-registered from a new process."""
        self.queue.writer_replaced(room, writer)

    @property
    def targets(self) -> Mapping[int, PrefillTarget]:
        """Resolved rooms still in the queues and the prefill ranks that serve them."""
        return self._targets

    def _renew_leases(self) -> None:
        """Tell prefills which of their rooms wait here only for memory (see ``Waiting``)."""
        assert self.send_waiting is not None
        items = [(r, self._targets[r]) for r in self.queue.leases() if r in self._targets]
        if items:
            self.send_waiting(items)

    def _verify(self, local: np.ndarray) -> None:
        """Checksums, where configured, are checked once the gate has let a room through."""
        assert self.verify is not None
        queue = self.queue
        for i in (local == SUCCESS).nonzero()[0].tolist():
            room = int(queue.cols.rooms[i])
            if room in self._verified or queue.cols.stage[i] == FENCED:
                continue
            problem = self.verify(
                room,
                self._targets[room],
                queue.allocated[room],
                int(queue.cols.slot[i]),
                (self.queue.checksums or {}).get(room, {}),
            )
            if problem is None:
                self._verified.add(room)
            else:
                queue.fail(room, problem)
                local[i] = FAILED

    def _resolve(self) -> None:
        found = self.directory.resolve(self._unresolved)
        if not found:
            return
        still = []
        for request in self._unresolved:
            outcome = found.get(request.room)
            if outcome is None:
                still.append(request)
            elif isinstance(outcome, str):
                self.queue.fail(request.room, outcome)
                self._observe_resolved(request.room, False)
            else:
                self._observe_resolved(request.room, True)
                self._targets[request.room] = outcome
                self.manager.receiver_init(request.room, outcome.peers)
                self.queue.initialised(request.room, len(outcome.peers), outcome.controls or None)
        self._unresolved = still

    def finish(self, reduced: np.ndarray) -> DecodeStep:
        late = self._late_causes()
        if not len(reduced):
            return DecodeStep(late_causes=late)
        decisions = self.queue.apply(reduced, self.clock())
        now = self.clock()
        for room in decisions.stamp_moved:
            self.stamp_moved += 1
            log.warning(
                "room %d: its aux slot was written again after the metadata gate passed (a "
                "write past the abort fence?); committed with the row the gate checked",
                room,
            )
        for meta in decisions.send_metadata:
            target = self._targets[meta.room]
            for writer in target.controls:
                self.liveness.expect(writer, now)
            self.manager.receiver_send_metadata(meta.room, meta.pages, meta.aux_slot)
            self.send_metadata(meta, target)
            if self.observers.active:
                self._since[meta.room] = self.clock()
        step = decisions.step
        for room in step.released:
            self._fence_plans.pop(room, None)
        for done in step.committed:
            self._addr_of.pop(done.room, None)
            self.manager.receiver_clear(done.room)
            self._targets.pop(done.room, None)
            self._verified.discard(done.room)
            if self.observers.active:
                self.observers.call(
                    "kvbridge_transfer_finished",
                    role=Role.DECODE,
                    rank=self.manager.rank,
                    room=done.room,
                    nbytes=len(done.pages) * self.page_bytes + done.aux_row.nbytes,
                    seconds=self.clock() - self._since.pop(done.room, self.clock()),
                )
            self._finished(done.room, KVPoll.Success, None, False)
        for failed in step.aborted:
            self.manager.receiver_abort(failed.room, failed.reason)
            self.manager.receiver_clear(failed.room)
            lost: PrefillTarget | None = self._targets.pop(failed.room, None)
            if lost is not None and failed.room in self.queue.fenced:
                self._fence_plans[failed.room] = lost
            notice = abort_notice(failed, lost, self._addr_of.pop(failed.room, ""))
            self._verified.discard(failed.room)
            if self.send_abort is not None and notice is not None:
                self.send_abort(notice)
            self._unresolved = [r for r in self._unresolved if r.room != failed.room]
            log_abort("decode", failed)
            self._since.pop(failed.room, None)
            self._finished(failed.room, KVPoll.Failed, failed.reason, failed.from_other_rank)
        self.observers.call(
            "kvbridge_step",
            role=Role.DECODE,
            rank=self.manager.rank,
            queued=len(self.queue),
            reduced=len(reduced),
            stages=self.queue.cols.stage,
            fenced_bytes=self.queue.fenced_pages * self.page_bytes if self.queue.fenced else 0,
        )
        return attrs.evolve(step, late_causes=late) if late else step

    def _late_causes(self) -> tuple[LateCause, ...]:
        """Root causes for rooms already aborted here as "failed on another rank" (rule 7):
        logged once each, told to the observers, and handed to the engine in the step."""
        late = self.queue.take_late_causes()
        report_late_causes(Role.DECODE, self.manager.rank, late, self.observers)
        return late

    def _observe_resolved(self, room: int, ok: bool) -> None:
        if self.observers.active:
            self.observers.call(
                "kvbridge_resolved",
                role=Role.DECODE,
                rank=self.manager.rank,
                room=room,
                seconds=self.clock() - self._since.get(room, self.clock()),
                ok=ok,
            )

    def _finished(self, room: int, status: KVPoll, reason: str | None, other: bool) -> None:
        self.observers.call(
            "kvbridge_request_finished",
            role=Role.DECODE,
            rank=self.manager.rank,
            room=room,
            status=status,
            reason=reason,
            from_other_rank=other,
        )


def _one_sided(manager: TransportManager) -> bool:
    """Whether the transport's writes are one-sided (its capability; see the fence policy in
    :class:`~kvbridge.protocol.decode.DecodeQueue`)."""
    info = getattr(getattr(manager, "transport", None), "info", None)
    return info is not None and info.one_sided_writes
