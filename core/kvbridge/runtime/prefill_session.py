"""A prefill rank's session (see :mod:`kvbridge.runtime` for how a step runs).

It binds each room to the decode ranks whose metadata completes it first, turns chunks into
descriptors, announces completions (and checksums), and acknowledges aborts only once the
transport has drained the room.
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
from kvbridge.memory import aux_descriptors, kv_descriptors
from kvbridge.observe import ObserverRelay
from kvbridge.protocol.columns import FAILED, SUCCESS
from kvbridge.protocol.early import EarlyMessages
from kvbridge.protocol.outcomes import LateCause, PrefillStep
from kvbridge.protocol.plan import DecodeMetadata, DecodePeer
from kvbridge.protocol.prefill import PrefillQueue, PrefillRequest
from kvbridge.ratelimit import ThrottledWarning
from kvbridge.runtime.collective import Reducer
from kvbridge.runtime.wiring import (
    AckSink,
    ChecksumSink,
    Clock,
    CompletionSink,
    log_abort,
    report_late_causes,
)
from kvbridge.transport.facade import TransportManager
from kvbridge.types import Descriptors, MemoryRegion, PeerWrite, Role, SendChunk

log = logging.getLogger("kvbridge")
_MAX_TOMBSTONES = 100_000
#: Rooms aborted "from another rank" remembered for a decode root cause arriving late.
_MAX_FOLLOWED = 4096


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
    ) -> None:
        self.manager = manager
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
        self.queue = PrefillQueue(
            authoritative=manager is not None,
            bootstrap_timeout=config.bootstrap_timeout,
            waiting_timeout=config.waiting_timeout,
        )
        self.decode_peers: dict[Any, DecodePeer] = {}
        self._metadata: dict[int, dict[Any, DecodeMetadata]] = {}
        self._targets: dict[int, tuple[tuple[DecodePeer, DecodeMetadata], ...]] = {}
        self._offsets: dict[int, int] = {}
        self._notified: set[int] = set()
        self._sent: dict[int, list[float]] = {}  # observers only: room -> [first send, bytes]
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        #: Decode may hear of a request before this prefill rank does: metadata and aborts
        #: from registered decode ranks wait here until add() brings the room, or expire
        #: after ``bootstrap_timeout``; bounded, so a flood evicts its own (counted).
        self.early = EarlyMessages(config.bootstrap_timeout)
        # Decode may ask about a failed room as late as it waits for memory, then transfers.
        self._ended_ttl = config.bootstrap_timeout + config.waiting_timeout
        #: Aborted rooms whose writes may still be landing: who to acknowledge once drained.
        self._draining: dict[int, dict[Any, DecodePeer]] = {}
        #: Decode ranks that asked to abort each live room.
        self._abort_senders: dict[int, set[Any]] = {}
        #: Rooms that ended here without success, so late metadata is answered, not written.
        self._ended: dict[int, tuple[float, str | None]] = {}
        #: Rooms that ended here only because another rank failed, and the decode ranks
        #: whose root cause may still come (None: any registered one; the room was unbound).
        self._followed: dict[int, frozenset[Any] | None] = {}
        self._late: list[LateCause] = []
        #: Messages dropped because their sender may not say that (rule 9).
        self.untrusted = 0
        # A peer may trigger these at will: the first is logged, then a periodic count.
        self._warn_untrusted = ThrottledWarning(log, "untrusted control messages ignored")
        self._warn_evicted = ThrottledWarning(log, "rooms' early decode messages evicted")
        self._warn_expired = ThrottledWarning(log, "rooms' early decode messages expired")

    @property
    def authoritative(self) -> bool:
        return self.manager is not None

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, requests: Sequence[PrefillRequest]) -> None:
        self.queue.add(requests, self.clock())
        for r in requests:
            self._followed.pop(r.room, None)  # a new life for the room number
        if self.manager is not None:
            for r in requests:
                self.manager.sender_construct(r.room)
        if self.early:
            for r in requests:
                for kind, payload in self.early.pop(r.room):
                    self._apply_event(kind, payload)

    def pending_early(self) -> int:
        """Rooms with messages waiting for this rank to add them."""
        return len(self.early)

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

    def abort(self, room: int, reason: str) -> None:
        """The engine gives up on ``room``. Scheduler thread; see ``DecodeSession.abort``."""
        self.queue.fail(room, reason)

    def requested_pages(self, room: int) -> int | None:
        """How many pages decode allocated for ``room`` (None before its metadata arrived).

        Fewer than the prompt's pages when decode had a prefix-cache hit of its own: this
        rank then sends only the request's last pages.
        """
        counts = {len(meta.pages) for _, meta in self._targets.get(room, ()) if meta.writes}
        return max(counts) if counts else None

    def live_decode_controls(self) -> set[Any]:
        """Control addresses of decode ranks with rooms in flight here (heartbeat targets)."""
        keys: set[Any] = set()
        for senders in self._metadata.values():
            keys.update(senders)
        # Metadata that came before the engine added the room (a router that dispatches to
        # both sides at once, a long forward pass): that decode rank waits on us too.
        keys.update(
            payload.decode_rank for kind, payload in self.early.messages() if kind == "meta"
        )
        for peers in self._draining.values():
            keys.update(peers)
        return {self.decode_peers[k].control for k in keys if k in self.decode_peers}

    @property
    def draining(self) -> int:
        """Aborted rooms whose writes the transport has not yet confirmed stopped."""
        return len(self._draining)

    def step(self) -> PrefillStep:
        local = self.prepare()
        reduced = self.reducer(local, self.queue.rooms) if len(local) else local
        return self.finish(reduced)

    def prepare(self) -> np.ndarray:
        while self._events:
            self._apply_event(*self._events.popleft())
        if self.early or self._ended:
            self._expire_early()
        now = self.clock()
        self._warn_untrusted.flush(now)
        self._warn_evicted.flush(now)
        self._warn_expired.flush(now)
        if self._draining:
            self._acknowledge_drained()
        queue = self.queue
        if not len(queue):
            return np.zeros(0, dtype=np.uint8)
        if self.manager is None:
            statuses = np.full(len(queue), SUCCESS, dtype=np.uint8)
            failures: dict[int, str] = {}
        else:
            statuses, failures = self.manager.sender_poll(queue.rooms)
            self._announce_completions(statuses)
        return queue.local_statuses(statuses, failures, self.clock())

    def _untrusted(self, what: str, *args: Any) -> None:
        self.untrusted += 1
        self._warn_untrusted(self.clock(), "ignored " + what, *args)

    def _apply_event(self, kind: str, payload: Any) -> None:
        if kind == "peer":
            key, peer = payload
            known = self.decode_peers.get(key)
            if known is not None and known != peer:
                self._untrusted("a second registration of decode rank %r with other memory", key)
            else:
                self.decode_peers[key] = peer
            return
        if kind == "waiting":
            sender, rooms = payload
            if sender not in self.decode_peers:
                self._untrusted("a memory lease from unregistered decode rank %r", sender)
            else:
                self.queue.renew(rooms, self.clock())
                for room in rooms.tolist():
                    if room in self._ended:
                        self._answer_ended(room, sender)
            return
        room = payload.room if kind == "meta" else payload[0]
        if self.queue.cols.index_of(room) is None:
            sender = payload[2] if kind == "abort" else payload.decode_rank
            if sender is not None and sender not in self.decode_peers:
                # Nothing from it could count once the room arrives: drop it now, not then.
                self._untrusted(
                    "%s for room %d from unregistered decode rank %r", kind, room, sender
                )
                return
            if kind == "abort":
                self._abort_unqueued(room, sender)
                if room in self._ended:
                    self._abort_ended(room, payload[1], sender)
                    return  # it ended here already: nothing left to fail later
            elif room in self._ended:
                self._answer_ended(room, sender)
                return
            evicted = self.early.keep(room, sender, kind, payload, self.clock())
            if evicted is not None:
                self._warn_evicted(
                    self.clock(),
                    "dropped decode messages for room %d: more than %d rooms wait for this "
                    "prefill rank to add them",
                    evicted,
                    self.early.capacity,
                )
        elif kind == "meta":
            self._take_metadata(payload)
        else:
            _, reason, sender = payload
            if sender is not None:
                asked = self._metadata.get(room)
                if sender not in self.decode_peers or (asked and sender not in asked):
                    self._untrusted(
                        "an abort of room %d from %r: not its decode rank", room, sender
                    )
                    return
                self._abort_senders.setdefault(room, set()).add(sender)
            if reason is None:
                self.queue.follow(room)
            else:
                self.queue.fail(room, f"decode aborted: {reason}")

    def _abort_unqueued(self, room: int, sender: Any) -> None:
        """An abort for a room not queued here: nothing of it is being written, say so now.

        The room either ended here (its writes finished or drained) or was never added; in
        the latter case the abort also waits in ``early`` so a later ``add`` fails the room
        before anything is sent. ``sender`` is a registered decode rank (or None: unchecked).
        """
        peer = self.decode_peers.get(sender)
        if peer is not None and self.acknowledge is not None:
            self._acknowledge_when_drained(room, sender, peer)

    def _abort_ended(self, room: int, reason: str | None, sender: Any) -> None:
        """A decode rank aborts a room that already ended here (rule 7, both directions).

        Its root cause is kept once when this rank only followed another's failure; a
        follower is told this rank's own root cause (it may have ended the room on decode
        before anything asked this rank, so the cause would never cross otherwise).
        """
        if reason is not None and room in self._followed:
            keys = self._followed[room]
            if sender is not None and keys is not None and sender not in keys:
                self._untrusted("an abort of room %d from %r: not its decode rank", room, sender)
                return
            del self._followed[room]
            self._late.append(LateCause(room, f"decode aborted: {reason}"))
        elif reason is None and self._ended[room][1] is not None:
            peer = self.decode_peers.get(sender)
            if peer is not None and self.notify_decode is not None:
                self.notify_decode(room, (peer,), False, self._ended[room][1])

    def _acknowledge_when_drained(self, room: int, key: Any, peer: DecodePeer) -> None:
        draining = self._draining.get(room)
        if draining is not None:
            draining[key] = peer  # its writes may still land: acknowledged once drained
        elif self.acknowledge is not None:
            self.acknowledge(room, (peer,))

    def _answer_ended(self, room: int, decode_key: Any) -> None:
        """Decode still wants a room that already failed here: tell it why, at once."""
        peer = self.decode_peers.get(decode_key)
        if peer is None:
            return
        reason = self._ended[room][1]
        if self.notify_decode is not None:
            self.notify_decode(room, (peer,), False, reason)
        self._acknowledge_when_drained(room, decode_key, peer)

    def _acknowledge_drained(self) -> None:
        assert self.manager is not None
        rooms = np.fromiter(self._draining, dtype=np.uint64, count=len(self._draining))
        drained = self.manager.sender_drained(rooms)
        for room in rooms[drained].tolist():
            peers = self._draining.pop(room)
            self.manager.sender_clear(room)
            if self.acknowledge is not None and peers:
                self.acknowledge(room, tuple(peers.values()))

    def _expire_early(self) -> None:
        now = self.clock()
        ended_limit = now - self._ended_ttl
        if self._ended and (
            len(self._ended) > _MAX_TOMBSTONES or next(iter(self._ended.values()))[0] < ended_limit
        ):
            # Insertion order is end order: drop from the front while too old or too many.
            while self._ended:
                room, (t, _) = next(iter(self._ended.items()))
                if t >= ended_limit and len(self._ended) <= _MAX_TOMBSTONES:
                    break
                del self._ended[room]
        for room in self.early.expire(now):
            self._warn_expired(
                now,
                "dropped decode messages for room %d: it was not queued on this "
                "prefill rank within bootstrap_timeout (never added, or already ended)",
                room,
            )

    def _take_metadata(self, meta: DecodeMetadata) -> None:
        if self.manager is None:
            log.debug("metadata for room %d ignored (no-op CP rank)", meta.room)
            return
        peer = self.decode_peers.get(meta.decode_rank)
        if peer is None:
            self._untrusted(
                "metadata for room %d from unregistered %r", meta.room, meta.decode_rank
            )
            return
        got = self._metadata.setdefault(meta.room, {})
        if meta.room in self._targets or meta.decode_rank in got:
            # The first complete set binds the room to its decode ranks; never re-point it.
            known = got.get(meta.decode_rank)
            if known is None or not _same_metadata(known, meta):
                self._untrusted(
                    "metadata for room %d from %r: the room is already bound",
                    meta.room,
                    meta.decode_rank,
                )
            return
        problem = _metadata_problem(meta, peer, self.kv_regions, self.aux_regions)
        if problem is not None:
            self.queue.fail(meta.room, f"decode {meta.decode_rank} sent bad metadata: {problem}")
            return
        got[meta.decode_rank] = meta
        if len(got) == meta.expected and meta.room not in self._targets:
            ordered = tuple((self.decode_peers[k], got[k]) for k in sorted(got, key=repr))
            self._targets[meta.room] = ordered
            self.manager.sender_init(meta.room, tuple(p.endpoint for p, _ in ordered))
            self.queue.metadata_complete(meta.room)

    def _announce_completions(self, statuses: np.ndarray) -> None:
        if self.notify_decode is None:
            return
        for i in np.flatnonzero(statuses == SUCCESS).tolist():
            room = int(self.queue.rooms[i])
            if room not in self._notified and room in self._targets:
                self._notified.add(room)
                # Only ranks this rank wrote to count a completion from it.
                written = tuple(p for p, m in self._targets[room] if m.writes)
                if written and self.notify_checksum is not None:
                    self._send_checksums(room)
                if written:
                    self.notify_decode(room, written, True, None)

    def _send_checksums(self, room: int) -> None:
        assert self.notify_checksum is not None
        pages = np.concatenate(self._sent_pages.get(room, [np.zeros(0, dtype=np.int64)]))
        slot = self._sent_aux.get(room, -1)
        for peer, meta in self._targets[room]:
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
        targets = self._targets.get(room)
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
            parts = [
                kv_descriptors(
                    self.kv_regions,
                    peer.kv_regions,
                    pages,
                    dst,
                    src_offset=src_offset,
                    dst_offset=dst_offset,
                    length=length,
                )
            ]
            if is_last:
                if aux_slot < 0:
                    raise ValueError("the last chunk needs the aux_slot holding the aux row")
                parts.append(
                    aux_descriptors(self.aux_regions, peer.aux_regions, aux_slot, meta.aux_slot)
                )
            writes.append(PeerWrite(peer_index, Descriptors.concat(parts)))
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
            self._drop(room)
            if self.manager is not None:
                self.manager.sender_clear(room)
        for failed in step.aborted:
            room = failed.room
            targets = self._targets.get(room, ())
            # Everyone who may be waiting on this room: its metadata senders and aborters.
            told = {k: self.decode_peers[k] for k in self._metadata.get(room, {})}
            for k in self._abort_senders.get(room, ()):
                told[k] = self.decode_peers[k]
            if failed.from_other_rank:
                bound = room in self._targets
                self._followed[room] = frozenset(self._metadata.get(room, ())) if bound else None
                if len(self._followed) > _MAX_FOLLOWED:
                    del self._followed[next(iter(self._followed))]
            self._drop(room)
            self._ended[room] = (self.clock(), None if failed.from_other_rank else failed.reason)
            if self.manager is not None:
                self.manager.sender_abort(room, failed.reason)
                # Cleared, and acknowledged to decode, only once no write can land (rule 8).
                self._draining[room] = told
                if self.notify_decode is not None and targets:
                    reason = None if failed.from_other_rank else failed.reason
                    self.notify_decode(room, tuple(p for p, _ in targets), False, reason)
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
        late, self._late = tuple(self._late), []
        if self.manager is not None:
            report_late_causes(Role.PREFILL, self.manager.rank, late, self.observers)
        else:  # a non-authoritative CP rank: no rank identity to report for observers
            report_late_causes(Role.PREFILL, None, late, None)
        return late

    def _drop(self, room: int) -> None:
        self._abort_senders.pop(room, None)
        self._sent_pages.pop(room, None)
        self._sent_aux.pop(room, None)
        self._sent.pop(room, None)
        self._metadata.pop(room, None)
        self._targets.pop(room, None)
        self._offsets.pop(room, None)
        self._notified.discard(room)


def _same_metadata(a: DecodeMetadata, b: DecodeMetadata) -> bool:
    return (
        a.aux_slot == b.aux_slot
        and a.expected == b.expected
        and a.page_slice == b.page_slice
        and a.writes == b.writes
        and np.array_equal(a.pages, b.pages)
    )


def _metadata_problem(
    meta: DecodeMetadata,
    peer: DecodePeer,
    kv_regions: tuple[MemoryRegion, ...],
    aux_regions: tuple[MemoryRegion, ...] = (),
) -> str | None:
    """Why ``meta`` cannot be written into ``peer``'s registered memory, or None if it can."""
    if not meta.writes:
        return None
    pages = meta.pages
    if peer.kv_regions and len(pages):
        limit = min(r.num_items for r in peer.kv_regions)
        if int(pages.max()) >= limit:
            return f"page {int(pages.max())} is out of range (decode registered {limit} pages)"
    if not peer.aux_regions:
        return "decode registered no aux rows"
    rows = min(r.num_items for r in peer.aux_regions)
    if not 0 <= meta.aux_slot < rows:
        return f"aux slot {meta.aux_slot} is out of range (decode registered {rows} rows)"
    # A whole row is copied: a shorter decode row would be overrun (another slot, or past it).
    mine = [r.item_bytes for r in aux_regions]
    theirs = [r.item_bytes for r in peer.aux_regions]
    if mine and mine != theirs:
        return f"decode registered aux rows of {theirs} bytes, this prefill writes rows of {mine}"
    if meta.page_slice is not None and peer.kv_regions and kv_regions:
        src_offset, dst_offset, length = meta.page_slice
        src_page = min(r.item_bytes for r in kv_regions)
        dst_page = min(r.item_bytes for r in peer.kv_regions)
        if length <= 0 or src_offset + length > src_page or dst_offset + length > dst_page:
            return (
                f"page slice (src {src_offset}, dst {dst_offset}, {length} bytes) does not "
                f"fit pages of {src_page} / {dst_page} bytes"
            )
    return None
