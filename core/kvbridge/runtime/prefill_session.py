"""A prefill rank's session (see :mod:`kvbridge.runtime` for how a step runs).

It performs what :class:`~kvbridge.protocol.prefill_rooms.PrefillRooms` decides (binding,
trust, early and ended rooms, who hears of an abort, drain-then-acknowledge): it calls the
transport, hands messages to the control channel's sinks and logs; and it turns chunks into
descriptors and computes checksums.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from kvbridge.checksum import room_checksum
from kvbridge.config import TransferConfig
from kvbridge.memory import chunk_descriptors
from kvbridge.observe import ObserverRelay
from kvbridge.protocol.columns import FAILED, SUCCESS
from kvbridge.protocol.messages import Message
from kvbridge.protocol.outcomes import LateCause, PrefillStep
from kvbridge.protocol.plan import DecodeMetadata, DecodePeer
from kvbridge.protocol.prefill import PrefillQueue, PrefillRequest
from kvbridge.protocol.prefill_rooms import (
    Acknowledge,
    Decision,
    Drained,
    Evicted,
    Expired,
    PrefillRooms,
    Refused,
    StartSending,
    StopSending,
    Tell,
)
from kvbridge.ratelimit import ThrottledWarning
from kvbridge.runtime.collective import Reducer, gather_causes
from kvbridge.runtime.wiring import (
    AckSink,
    ChecksumSink,
    Clock,
    CompletionSink,
    log_abort,
    report_late_causes,
)
from kvbridge.transport.facade import TransportManager
from kvbridge.types import MemoryRegion, PeerWrite, Role, SendChunk

log = logging.getLogger("kvbridge")


class PrefillSession:
    """One prefill rank's side of kvbridge.

    ``manager`` is None on a non-authoritative CP rank: it transfers nothing and only takes
    part in the reductions.
    """

    def __init__(
        self,
        *,
        config: TransferConfig,
        manager: TransportManager | None,
        kv_regions: Sequence[MemoryRegion] = (),
        aux_regions: Sequence[MemoryRegion] = (),
        reducer: Reducer,
        notify_decode: CompletionSink | None = None,
        acknowledge: AckSink | None = None,
        notify_checksum: ChecksumSink | None = None,
        clock: Clock = time.monotonic,
        observers: ObserverRelay | None = None,
        origin: str = "",
    ) -> None:
        self.manager = manager
        #: This rank as a root cause's origin names it to the rest of its group.
        self.origin = origin or (manager.rank.label if manager is not None else "prefill")
        self.acknowledge = acknowledge
        self.notify_checksum = notify_checksum if config.verify_checksums else None
        self._sent_pages: dict[int, list[np.ndarray]] = {}
        self._sent_aux: dict[int, int] = {}
        self.kv_regions = tuple(kv_regions)
        self.aux_regions = tuple(aux_regions)
        self.reducer = reducer
        self.notify_decode = notify_decode
        self.clock = clock
        self.observers = observers or ObserverRelay()
        self.rooms = PrefillRooms(
            authoritative=manager is not None,
            bootstrap_timeout=config.bootstrap_timeout,
            waiting_timeout=config.waiting_timeout,
            kv_regions=self.kv_regions,
            aux_regions=self.aux_regions,
        )
        self.queue: PrefillQueue = self.rooms.queue
        self._offsets: dict[int, int] = {}
        self._sent: dict[int, list[float]] = {}  # observers only: room -> [first send, bytes]
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        # A peer may trigger these at will: the first is logged, then a periodic count.
        self._warn_untrusted = ThrottledWarning(log, "untrusted control messages ignored")
        self._warn_evicted = ThrottledWarning(log, "rooms' early decode messages evicted")
        self._warn_expired = ThrottledWarning(log, "rooms' early decode messages expired")

    @property
    def untrusted(self) -> int:
        """Messages dropped because their sender may not say that (rule 9)."""
        return self.rooms.untrusted

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def authoritative(self) -> bool:
        return self.manager is not None

    def add(self, requests: Sequence[PrefillRequest]) -> None:
        decisions = self.rooms.add(requests, self.clock())
        if self.manager is not None:
            for r in requests:
                self.manager.sender_construct(r.room)
        self._perform(decisions)

    def pending_early(self) -> int:
        """Rooms with messages waiting for this rank to add them."""
        return len(self.rooms.early)

    def receive(self, message: Message) -> None:
        """A control message from a decode rank (its role already checked). Thread-safe."""
        self._events.append(("message", message))

    def refuse(self, message: Message) -> None:
        """A control message this role never receives (``WHO_MAY_SEND``). Thread-safe."""
        self._events.append(("refuse", message))

    def register_decode_peer(self, key: Any, peer: DecodePeer) -> None:
        """Thread-safe."""
        self._events.append(("peer", (key, peer)))

    def on_metadata(self, meta: DecodeMetadata) -> None:
        """A decode rank's metadata arrived. Thread-safe."""
        self._events.append(("meta", meta))

    def on_waiting(self, sender: Any, rooms: np.ndarray) -> None:
        """Decode rank ``sender`` still waits for memory for ``rooms``. Thread-safe."""
        self._events.append(("waiting", (sender, rooms)))

    def on_decode_abort(self, room: int, reason: str | None, sender: Any = None) -> None:
        """Decode rank ``sender`` gave up on ``room`` (None: not checked). Thread-safe.

        ``reason`` None: that decode rank only followed another decode rank's failure.
        """
        self._events.append(("abort", (room, reason, sender)))

    def abort(self, room: int, reason: str, *, follows: bool = False) -> None:
        """The engine gives up on ``room``. Scheduler thread; see ``DecodeNode.abort`` and
        ``PrefillRooms.engine_abort`` (a room never added here ends at once)."""
        if follows:
            log.debug("prefill room %d: the engine follows another rank: %s", room, reason)
        self._perform(self.rooms.engine_abort(room, reason, self.clock(), follows=follows))

    def requested_pages(self, room: int) -> int | None:
        """How many pages decode allocated for ``room`` (None before its metadata arrived).

        Fewer than the prompt's pages when decode had a prefix-cache hit of its own: this
        rank then sends only the request's last pages.
        """
        return self.rooms.requested_pages(room)

    def live_decode_controls(self) -> set[Any]:
        """Control addresses of decode ranks with rooms in flight here (heartbeat targets)."""
        return self.rooms.live_decode_controls()

    @property
    def draining(self) -> int:
        """Aborted rooms whose writes the transport has not yet confirmed stopped."""
        return self.rooms.draining

    def step(self) -> PrefillStep:
        local = self.prepare()
        reduced = self.reducer(local, self.queue.rooms) if len(local) else local
        return self.finish(reduced)

    def prepare(self) -> np.ndarray:
        rooms = self.rooms
        while self._events:
            self._perform(self._take(*self._events.popleft()))
        now = self.clock()
        self._perform(rooms.expire(now))
        self._warn_untrusted.flush(now)
        self._warn_evicted.flush(now)
        self._warn_expired.flush(now)
        if rooms.draining:
            assert self.manager is not None
            draining = rooms.draining_rooms()
            self._perform(rooms.drained(draining, self.manager.sender_drained(draining)))
        queue = self.queue
        if not len(queue):
            return np.zeros(0, dtype=np.uint8)
        if self.manager is None:
            statuses = np.full(len(queue), SUCCESS, dtype=np.uint8)
            failures: dict[int, str] = {}
        else:
            statuses, failures = self.manager.sender_poll(queue.rooms)
            self._perform(rooms.announce(statuses))
        return queue.local_statuses(statuses, failures, self.clock())

    def _take(self, kind: str, payload: Any) -> list[Decision]:
        rooms, now = self.rooms, self.clock()
        if kind == "message":
            return rooms.on_message(payload, now)
        if kind == "refuse":
            rooms.untrusted += 1
            return [Refused("a %s control message on a prefill rank", (type(payload).__name__,))]
        if kind == "peer":
            key, peer = payload
            return rooms.register(key, peer, now)
        if kind == "meta":
            return rooms.metadata(payload, now)
        if kind == "waiting":
            sender, waiting = payload
            return rooms.waiting(sender, waiting, now)
        room, reason, sender = payload
        return rooms.decode_abort(room, reason, sender, now)

    def _perform(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d, Tell):
                if d.ok and self.notify_checksum is not None:
                    self._send_checksums(d.room)  # before the completion they belong to
                if self.notify_decode is not None:
                    self.notify_decode(d.room, d.peers, d.ok, d.reason)
            elif isinstance(d, Acknowledge):
                if self.acknowledge is not None:
                    self.acknowledge(d.room, d.peers)
            elif isinstance(d, StartSending):
                assert self.manager is not None
                self.manager.sender_init(d.room, d.peers)
            elif isinstance(d, StopSending):
                assert self.manager is not None
                self.manager.sender_abort(d.room, d.reason)
            elif isinstance(d, Drained):
                assert self.manager is not None
                self.manager.sender_clear(d.room)
            elif isinstance(d, Refused):
                self._warn_untrusted(self.clock(), "ignored " + d.what, *d.args)
            elif isinstance(d, Evicted):
                self._warn_evicted(
                    self.clock(),
                    "dropped decode messages for room %d: more than %d rooms wait for this "
                    "prefill rank to add them",
                    d.room,
                    d.capacity,
                )
            elif isinstance(d, Expired):
                self._warn_expired(
                    self.clock(),
                    "dropped decode messages for room %d: it was not queued on this "
                    "prefill rank within bootstrap_timeout (never added, or already ended)",
                    d.room,
                )

    def _group_causes(self, step: PrefillStep) -> dict[int, str]:
        """Root causes other ranks of the group saw for rooms this rank only followed (rule
        7): without them a cause seen only on a rank that tells decode nothing (a
        non-authoritative CP rank) would reach decode as "failed on another rank"."""
        mine = {
            a.room: f"{a.reason} (on {self.origin})" for a in step.aborted if not a.from_other_rank
        }
        every = gather_causes(self.reducer, mine)
        found: dict[int, str] = {}
        for causes in every or ():
            if not isinstance(causes, dict):
                continue
            for room, reason in causes.items():
                if isinstance(reason, str):
                    found.setdefault(room, reason)  # the lowest group rank's, on every rank
        followed = (a.room for a in step.aborted if a.from_other_rank)
        return {room: found[room] for room in followed if room in found}

    def _send_checksums(self, room: int) -> None:
        assert self.notify_checksum is not None
        pages = np.concatenate(self._sent_pages.get(room, [np.zeros(0, dtype=np.int64)]))
        slot = self._sent_aux.get(room, -1)
        for peer, meta in self.rooms.targets(room) or ():
            if meta.writes:
                src_offset, _, length = meta.page_slice or (0, 0, None)
                crc = room_checksum(
                    self.kv_regions, self.aux_regions, pages, slot, src_offset, length
                )
                self.notify_checksum(room, peer, crc)

    def send(self, room: int, pages: np.ndarray, *, is_last: bool, aux_slot: int = -1) -> None:
        """Send the next chunk of ``room``: ``pages`` are this rank's source page indices for
        the next positions of the request; the last chunk also copies aux row ``aux_slot``.

        Call on every rank of the group in the same step (non-authoritative ranks send nothing).
        """
        pages = np.asarray(pages, dtype=np.int64)
        i = self.queue.cols.index_of(room)
        if i is None or self.queue.cols.local[i] == FAILED:
            # Aborted in this step or earlier (the engine learns it from the step's result):
            # sending nothing is the answer, and nothing may be written any more.
            return
        if self.manager is not None:
            self._send_writes(room, pages, is_last, aux_slot)
        self.queue.sent(room, is_last, self.clock())

    def _send_writes(self, room: int, pages: np.ndarray, is_last: bool, aux_slot: int) -> None:
        assert self.manager is not None
        targets = self.rooms.targets(room)
        if targets is None:
            raise ValueError(f"room {room} has no decode metadata yet; wait until it is ready")
        offset = self._offsets.get(room, 0)
        writes = []
        for peer_index, (peer, meta) in enumerate(targets):
            if not meta.writes:
                continue
            dst = meta.pages[offset : offset + len(pages)]
            if len(dst) != len(pages):
                self.queue.fail(
                    room,
                    f"prefill sent {offset + len(pages)} pages but decode "
                    f"allocated {len(meta.pages)}",
                )
                return
            src_offset, dst_offset, length = meta.page_slice or (0, 0, None)
            aux = None
            if is_last:
                if aux_slot < 0:
                    raise ValueError("the last chunk needs the aux_slot holding the aux row")
                aux = (self.aux_regions, peer.aux_regions, aux_slot, meta.aux_slot)
            runs = chunk_descriptors(
                self.kv_regions,
                peer.kv_regions,
                pages,
                dst,
                src_offset=src_offset,
                dst_offset=dst_offset,
                length=length,
                aux=aux,
            )
            writes.append(PeerWrite(peer_index, runs))
        self._offsets[room] = offset + len(pages)
        if self.notify_checksum is not None:
            self._sent_pages.setdefault(room, []).append(pages)
            if is_last:
                self._sent_aux[room] = aux_slot
        if self.observers.active:
            sent = self._sent.setdefault(room, [self.clock(), 0])
            sent[1] += sum(int(w.descriptors.lengths.sum()) for w in writes)
        self.manager.sender_send(room, SendChunk(tuple(writes), is_last))

    def finish(self, reduced: np.ndarray) -> PrefillStep:
        late = self._late_causes()
        if not len(reduced):
            return PrefillStep(late_causes=late)
        step = self.queue.apply(reduced)
        for room in step.finished:
            sent = self._sent.get(room)
            if sent is not None and self.manager is not None:
                self.observers.call(
                    "kvbridge_transfer_finished",
                    role=Role.PREFILL,
                    rank=self.manager.rank,
                    room=room,
                    nbytes=sent[1],
                    seconds=self.clock() - sent[0],
                )
            if self.manager is not None:
                self.manager.sender_clear(room)
        for room in (*step.finished, *(a.room for a in step.aborted)):
            self._sent_pages.pop(room, None)
            self._sent_aux.pop(room, None)
            self._sent.pop(room, None)
            self._offsets.pop(room, None)
        causes = self._group_causes(step) if step.aborted else {}
        self._perform(self.rooms.finish(step, self.clock(), causes))
        for failed in step.aborted:
            log_abort("prefill", failed)
        if self.manager is not None:
            self.observers.call(
                "kvbridge_step",
                role=Role.PREFILL,
                rank=self.manager.rank,
                queued=len(self.queue),
                reduced=len(reduced),
                stages=self.queue.cols.stage,
                fenced_bytes=0,
            )
        return attrs.evolve(step, late_causes=late) if late else step

    def _late_causes(self) -> tuple[LateCause, ...]:
        """As ``DecodeSession._late_causes``: logged once, observed, handed to the engine."""
        late = self.rooms.take_late_causes()
        if self.manager is not None:
            report_late_causes(Role.PREFILL, self.manager.rank, late, self.observers)
        else:  # a non-authoritative CP rank: no rank identity to report for observers
            report_late_causes(Role.PREFILL, None, late, None)
        return late
