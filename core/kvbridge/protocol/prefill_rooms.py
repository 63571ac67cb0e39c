"""What a prefill rank knows of each room's decode side, as a pure state machine.

It decides, for what decode ranks send: rule 9 (the standings of
:data:`~kvbridge.protocol.messages.WHO_MAY_SEND` for registration, leases, metadata and
aborts, and the binding of a room to the first complete set of metadata); early and ended
rooms (messages for a room not yet added wait in :class:`~kvbridge.protocol.early.
EarlyMessages`; a room that ended here without success is remembered for a while, so late
metadata is answered with the failure instead of written); rule 7 on this side (who is told a
room failed; a root cause reaching a room this rank only followed); and rule 8's prefill half
(an abort is acknowledged once the transport says the room drained).

Every call returns decisions (:data:`Decision`) for :class:`~kvbridge.runtime.prefill_session.
PrefillSession` to perform; nothing here sends, logs or reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from kvbridge.protocol.columns import FAILED, SUCCESS
from kvbridge.protocol.early import EarlyMessages
from kvbridge.protocol.messages import Abort, Message, Metadata, Register, Waiting
from kvbridge.protocol.messages import regions_from_wire as _regions
from kvbridge.protocol.outcomes import LateCause, PrefillStep
from kvbridge.protocol.plan import DecodeMetadata, DecodePeer
from kvbridge.protocol.prefill import PrefillQueue, PrefillRequest
from kvbridge.types import Endpoint, MemoryRegion

#: Ended rooms remembered at most (the oldest go first), each for ``ended_ttl`` seconds.
MAX_ENDED = 100_000
#: Rooms aborted "from another rank" remembered for a decode root cause arriving late.
MAX_FOLLOWED = 4096
#: Decode ranks registered at most (decode instances x their TP ranks, with room to spare).
#: Without a secret anyone can register: past this, idle registrations are swept and, while
#: the table is still full, new ones are refused, so a flood cannot grow this rank's memory.
MAX_DECODE_PEERS = 1024
_NOT_ITS_DECODE = "an abort of room %d from %r: not its decode rank"


@attrs.frozen
class Tell:
    """Send ``peers`` a ``Status`` for ``room``: written (``ok``), or failed with ``reason``
    (None: this rank only followed another rank's failure)."""

    room: int
    peers: tuple[DecodePeer, ...]
    ok: bool
    reason: str | None = None


@attrs.frozen
class Acknowledge:
    """Send ``peers`` an ``AbortAck`` for ``room``: no write of it will land any more."""

    room: int
    peers: tuple[DecodePeer, ...]


@attrs.frozen
class StartSending:
    """Every decode rank's metadata for ``room`` arrived: initialise the transport's sender."""

    room: int
    peers: tuple[Endpoint, ...]


@attrs.frozen
class StopSending:
    """``room`` aborted here: abort the transport's sender (acknowledged once drained)."""

    room: int
    reason: str


@attrs.frozen
class Drained:
    """The transport confirmed nothing of the aborted ``room`` lands any more: clear it."""

    room: int


@attrs.frozen
class Refused:
    """A message whose sender may not say that (rule 9), counted in ``untrusted``; ``what``
    (a %-format with ``args``) says which, for a throttled log line."""

    what: str
    args: tuple[Any, ...] = ()


@attrs.frozen
class Evicted:
    """The early store dropped ``room``'s messages to stay within ``capacity`` rooms."""

    room: int
    capacity: int


@attrs.frozen
class Expired:
    """``room``'s early messages waited ``bootstrap_timeout`` for an ``add`` that never came."""

    room: int


Decision = Tell | Acknowledge | StartSending | StopSending | Drained | Refused | Evicted | Expired


class PrefillRooms:
    """One prefill rank's rooms: the status queue plus everything decode ranks told it.

    ``authoritative`` False is a non-authoritative CP rank: it writes nothing, so it ignores
    metadata and takes part only in the reductions.
    """

    def __init__(
        self,
        *,
        authoritative: bool,
        bootstrap_timeout: float,
        waiting_timeout: float,
        kv_regions: Sequence[MemoryRegion] = (),
        aux_regions: Sequence[MemoryRegion] = (),
        max_decode_peers: int = MAX_DECODE_PEERS,
    ) -> None:
        self.queue = PrefillQueue(
            authoritative=authoritative,
            bootstrap_timeout=bootstrap_timeout,
            waiting_timeout=waiting_timeout,
        )
        self.kv_regions = tuple(kv_regions)
        self.aux_regions = tuple(aux_regions)
        self.decode_peers: dict[Any, DecodePeer] = {}
        self.max_decode_peers = max_decode_peers
        #: When each registered decode rank last said anything (for the sweep of idle ones).
        self._peer_seen: dict[Any, float] = {}
        self._bootstrap_timeout = bootstrap_timeout
        self._next_sweep = 0.0
        #: Metadata received per live room, by decode rank.
        self._metadata: dict[int, dict[Any, DecodeMetadata]] = {}
        #: Rooms bound to their decode ranks (the first complete set of metadata).
        self._targets: dict[int, tuple[tuple[DecodePeer, DecodeMetadata], ...]] = {}
        self._announced: set[int] = set()
        #: Decode may hear of a request before this prefill rank does: metadata and aborts
        #: from registered decode ranks wait here until add() brings the room, or expire
        #: after ``bootstrap_timeout``; bounded, so a flood evicts its own (counted).
        self.early = EarlyMessages(bootstrap_timeout)
        # Decode may ask about a failed room as late as it waits for memory, then transfers.
        self._ended_ttl = bootstrap_timeout + waiting_timeout
        #: Aborted rooms whose writes may still be landing: who to acknowledge once drained.
        self._draining: dict[int, dict[Any, DecodePeer]] = {}
        #: Decode ranks that asked to abort each live room.
        self._abort_senders: dict[int, set[Any]] = {}
        #: Decode ranks whose metadata failed a live room (out of their registered memory):
        #: not bound, but they wait on this rank for the room, so they hear why.
        self._rejected: dict[int, set[Any]] = {}
        #: Rooms that ended here without success (when, and this rank's own cause), so late
        #: metadata is answered, not written.
        self._ended: dict[int, tuple[float, str | None]] = {}
        #: Rooms that ended here only because another rank failed, and the decode ranks
        #: whose root cause may still come (None: any registered one; the room was unbound).
        self._followed: dict[int, frozenset[Any] | None] = {}
        self._late: list[LateCause] = []
        #: Messages refused because their sender may not say that (rule 9).
        self.untrusted = 0

    @property
    def authoritative(self) -> bool:
        return self.queue.authoritative

    # -- the engine's requests -----------------------------------------------------------------

    def add(self, requests: Sequence[PrefillRequest], now: float) -> list[Decision]:
        self.queue.add(requests, now)
        for r in requests:
            self._followed.pop(r.room, None)  # a new life for the room number
            self._ended.pop(r.room, None)
        out: list[Decision] = []
        if self.early:
            for r in requests:
                for kind, payload in self.early.pop(r.room):
                    out += self._event(kind, payload, now)
        return out

    def engine_abort(
        self, room: int, reason: str, now: float, *, follows: bool = False
    ) -> list[Decision]:
        """The engine gives up on ``room``; ``follows``: only because another rank of this
        group failed it (the engine's own consensus), so ``reason`` is no root cause here.

        A room never added here (the engine ended the request before its KV was ready: a
        client gone while a router's decode leg already waits) ends here at once: decode ranks
        whose metadata came early are told ``reason`` now, later ones when they ask, as for
        any room that failed here, so decode does not wait out ``bootstrap_timeout``."""
        if self.queue.cols.index_of(room) is not None:
            if follows:
                self.queue.follow(room)
            else:
                self.queue.fail(room, reason)
            return []
        if room in self._ended:
            return []
        self._ended[room] = (now, None if follows else reason)
        out: list[Decision] = []
        for kind, payload in self.early.pop(room):
            if kind == "meta":
                out += self._answer_ended(room, payload.decode_rank)
            elif kind == "abort":
                out += self._abort_unqueued(room, payload[2])
        return out

    # -- what decode ranks say -----------------------------------------------------------------

    def on_message(self, message: Message, now: float) -> list[Decision]:
        """A control message from a decode rank, as it came off the wire."""
        if isinstance(message, Register):
            peer = DecodePeer(
                message.endpoint,
                _regions(message.kv_regions),
                _regions(message.aux_regions),
                message.control,
            )
            return self.register(message.decode_key, peer, now)
        if isinstance(message, Metadata):
            meta = DecodeMetadata(
                message.room,
                message.decode_key,
                message.pages,
                message.aux_slot,
                message.expected,
                page_slice=message.route,
                writes=message.route is not None,
            )
            return self.metadata(meta, now)
        if isinstance(message, Waiting):
            return self.waiting(message.decode_key, message.rooms, now)
        if isinstance(message, Abort):
            return self.decode_abort(message.room, message.cause, message.sender_key, now)
        return self._refuse("a %s control message on a prefill rank", type(message).__name__)

    def register(self, key: Any, peer: DecodePeer, now: float = 0.0) -> list[Decision]:
        """Decode rank ``key`` says where its memory is; its first registration binds. At most
        ``max_decode_peers`` are kept (see :data:`MAX_DECODE_PEERS`)."""
        return self._event("peer", (key, peer), now)

    def metadata(self, meta: DecodeMetadata, now: float) -> list[Decision]:
        return self._event("meta", meta, now)

    def waiting(self, sender: Any, rooms: np.ndarray, now: float) -> list[Decision]:
        """Decode rank ``sender`` still waits for memory for ``rooms`` (a lease)."""
        return self._event("waiting", (sender, rooms), now)

    def decode_abort(
        self, room: int, reason: str | None, sender: Any, now: float
    ) -> list[Decision]:
        """Decode rank ``sender`` (None: not checked) gave up on ``room``; ``reason`` None:
        it only followed another decode rank's failure."""
        return self._event("abort", (room, reason, sender), now)

    def _sweep_idle_peers(self, now: float) -> None:
        """Forget registrations silent for ``bootstrap_timeout`` that nothing here refers to
        (at most once per ``bootstrap_timeout``: under a flood each sweep is a full scan).
        A decode rank forgotten here registers again after its own idle timeout."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._bootstrap_timeout
        in_use: set[Any] = set()
        for senders in self._metadata.values():
            in_use.update(senders)
        for aborters in self._abort_senders.values():
            in_use.update(aborters)
        for rejected in self._rejected.values():
            in_use.update(rejected)
        for peers in self._draining.values():
            in_use.update(peers)
        for keys in self._followed.values():
            in_use.update(keys or ())
        for kind, payload in self.early.messages():
            in_use.add(payload[2] if kind == "abort" else payload.decode_rank)
        idle_since = now - self._bootstrap_timeout
        for key in [k for k, t in self._peer_seen.items() if t < idle_since and k not in in_use]:
            del self.decode_peers[key]
            del self._peer_seen[key]

    def _refuse(self, what: str, *args: Any) -> list[Decision]:
        self.untrusted += 1
        return [Refused(what, args)]

    def _event(self, kind: str, payload: Any, now: float) -> list[Decision]:
        if kind == "peer":
            key, peer = payload
            known = self.decode_peers.get(key)
            if known is not None and known != peer:
                return self._refuse(
                    "a second registration of decode rank %r with other memory", key
                )
            if known is None and len(self.decode_peers) >= self.max_decode_peers:
                self._sweep_idle_peers(now)
                if len(self.decode_peers) >= self.max_decode_peers:
                    return self._refuse(
                        "a registration of decode rank %r: %d are registered (the most kept)",
                        key,
                        len(self.decode_peers),
                    )
            self.decode_peers[key] = peer
            self._peer_seen[key] = now
            return []
        if kind == "waiting":
            sender, rooms = payload
            if sender not in self.decode_peers:
                return self._refuse("a memory lease from unregistered decode rank %r", sender)
            self._peer_seen[sender] = now
            self.queue.renew(rooms, now)
            out: list[Decision] = []
            for room in rooms.tolist():
                if room in self._ended:
                    out += self._answer_ended(room, sender)
            return out
        room = payload.room if kind == "meta" else payload[0]
        sender = payload[2] if kind == "abort" else payload.decode_rank
        if sender in self._peer_seen:
            self._peer_seen[sender] = now
        if self.queue.cols.index_of(room) is None:
            if sender is not None and sender not in self.decode_peers:
                # Nothing from it could count once the room arrives: drop it now, not then.
                return self._refuse(
                    "%s for room %d from unregistered decode rank %r", kind, room, sender
                )
            out = []
            if kind == "abort":
                out += self._abort_unqueued(room, sender)
                if room in self._ended:
                    # It ended here already: nothing left to fail later.
                    return out + self._abort_ended(room, payload[1], sender)
            elif room in self._ended:
                return self._answer_ended(room, sender)
            evicted = self.early.keep(room, sender, kind, payload, now)
            if evicted is not None:
                out.append(Evicted(evicted, self.early.capacity))
            return out
        if kind == "meta":
            return self._take_metadata(payload)
        _, reason, sender = payload
        if sender is not None:
            # Until the room is bound every registered decode rank may be one of those whose
            # metadata is still to come (a client gone before that rank sent it); once bound,
            # only the room's own decode ranks count (rule 9).
            bound = room in self._targets
            asked = self._metadata.get(room) or {}
            if sender not in self.decode_peers or (bound and sender not in asked):
                return self._refuse(
                    "an abort of room %d from %r: not its decode rank", room, sender
                )
            self._abort_senders.setdefault(room, set()).add(sender)
        if reason is None:
            self.queue.follow(room)
        else:
            self.queue.fail(room, f"decode aborted: {reason}")
        return []

    def _take_metadata(self, meta: DecodeMetadata) -> list[Decision]:
        peer = self.decode_peers.get(meta.decode_rank)
        if peer is None:
            # Before the CP shortcut: a forgery counts the same on every rank (rule 9).
            return self._refuse(
                "metadata for room %d from unregistered %r", meta.room, meta.decode_rank
            )
        if not self.authoritative:
            return []  # a no-op CP rank writes nothing
        got = self._metadata.setdefault(meta.room, {})
        if meta.room in self._targets or meta.decode_rank in got:
            # The first complete set binds the room to its decode ranks; never re-point it.
            known = got.get(meta.decode_rank)
            if known is None or not same_metadata(known, meta):
                return self._refuse(
                    "metadata for room %d from %r: the room is already bound",
                    meta.room,
                    meta.decode_rank,
                )
            return []
        problem = metadata_problem(meta, peer, self.kv_regions, self.aux_regions)
        if problem is not None:
            self.queue.fail(meta.room, f"decode {meta.decode_rank} sent bad metadata: {problem}")
            self._rejected.setdefault(meta.room, set()).add(meta.decode_rank)
            return []
        got[meta.decode_rank] = meta
        if len(got) == meta.expected and meta.room not in self._targets:
            ordered = tuple((self.decode_peers[k], got[k]) for k in sorted(got, key=repr))
            self._targets[meta.room] = ordered
            i = self.queue.cols.index_of(meta.room)
            if i is not None and self.queue.cols.local[i] == FAILED:
                # Aborted already (this step, or in early messages that came first): bound,
                # so its decode ranks hear why, but no sender starts for it (rule 8).
                return []
            self.queue.metadata_complete(meta.room)
            return [StartSending(meta.room, tuple(p.endpoint for p, _ in ordered))]
        return []

    def _abort_unqueued(self, room: int, sender: Any) -> list[Decision]:
        """An abort for a room not queued here: nothing of it is being written, say so now.

        The room either ended here (its writes finished or drained) or was never added; in
        the latter case the abort also waits in ``early`` so a later ``add`` fails the room
        before anything is sent. ``sender`` is a registered decode rank (or None: unchecked).
        """
        peer = self.decode_peers.get(sender)
        return self._acknowledge_when_drained(room, sender, peer) if peer is not None else []

    def _abort_ended(self, room: int, reason: str | None, sender: Any) -> list[Decision]:
        """A decode rank aborts a room that already ended here (rule 7, both directions).

        Its root cause is kept once when this rank only followed another's failure; a
        follower is told this rank's own root cause (it may have ended the room on decode
        before anything asked this rank, so the cause would never cross otherwise).
        """
        if reason is not None and room in self._followed:
            keys = self._followed[room]
            if sender is not None and keys is not None and sender not in keys:
                return self._refuse(
                    "an abort of room %d from %r: not its decode rank", room, sender
                )
            del self._followed[room]
            self._late.append(LateCause(room, f"decode aborted: {reason}"))
        elif reason is None and self._ended[room][1] is not None:
            peer = self.decode_peers.get(sender)
            if peer is not None:
                return [Tell(room, (peer,), False, self._ended[room][1])]
        return []

    def _acknowledge_when_drained(self, room: int, key: Any, peer: DecodePeer) -> list[Decision]:
        draining = self._draining.get(room)
        if draining is not None:
            draining[key] = peer  # its writes may still land: acknowledged once drained
            return []
        return [Acknowledge(room, (peer,))]

    def _answer_ended(self, room: int, decode_key: Any) -> list[Decision]:
        """Decode still wants a room that already failed here: tell it why, at once."""
        peer = self.decode_peers.get(decode_key)
        if peer is None:
            return []
        tell: list[Decision] = [Tell(room, (peer,), False, self._ended[room][1])]
        return tell + self._acknowledge_when_drained(room, decode_key, peer)

    # -- time and the transport ----------------------------------------------------------------

    def expire(self, now: float) -> list[Decision]:
        """Forget ended rooms past ``ended_ttl`` (or too many) and early messages past
        ``bootstrap_timeout``."""
        if not (self.early or self._ended):
            return []
        ended_limit = now - self._ended_ttl
        if self._ended and (
            len(self._ended) > MAX_ENDED or next(iter(self._ended.values()))[0] < ended_limit
        ):
            # Insertion order is end order: drop from the front while too old or too many.
            while self._ended:
                room, (t, _) = next(iter(self._ended.items()))
                if t >= ended_limit and len(self._ended) <= MAX_ENDED:
                    break
                del self._ended[room]
                # A late root cause is looked for only in ended rooms: forget both together.
                self._followed.pop(room, None)
        return [Expired(room) for room in self.early.expire(now)]

    def draining_rooms(self) -> np.ndarray:
        """Aborted rooms whose drain the transport has not confirmed yet (ask it about these)."""
        return np.fromiter(self._draining, dtype=np.uint64, count=len(self._draining))

    def drained(self, rooms: np.ndarray, confirmed: np.ndarray | None) -> list[Decision]:
        """The transport's answer for :meth:`draining_rooms`: ``confirmed`` per room, or None
        when it cannot tell (a plugin for API 1.0, which has no ``kvbridge_sender_drained``).
        Drained rooms are cleared, then acknowledged to every decode rank that may wait on
        them (rule 8). Cannot tell counts as drained at once: the only answer that does not
        hold decode's memory forever, and the guarantee such a plugin never gave."""
        out: list[Decision] = []
        for room in (rooms if confirmed is None else rooms[confirmed]).tolist():
            peers = self._draining.pop(room)
            out.append(Drained(room))
            if peers:
                out.append(Acknowledge(room, tuple(peers.values())))
        return out

    def announce(self, statuses: np.ndarray) -> list[Decision]:
        """Rooms whose writes the transport reports done, told once to the decode ranks this
        rank wrote to (only they count a completion from it)."""
        out: list[Decision] = []
        for i in (statuses == SUCCESS).nonzero()[0].tolist():
            room = int(self.queue.rooms[i])
            if room not in self._announced and room in self._targets:
                self._announced.add(room)
                written = tuple(p for p, m in self._targets[room] if m.writes)
                if written:
                    out.append(Tell(room, written, True))
        return out

    # -- after the reduction -------------------------------------------------------------------

    def finish(
        self, step: PrefillStep, now: float, group_causes: Mapping[int, str] | None = None
    ) -> list[Decision]:
        """Forget finished rooms; for aborted ones decide who hears of it (rule 7) and start
        the drain that its acknowledgement waits for (rule 8).

        ``group_causes``: for rooms this rank only followed, the root cause another rank of
        the group saw, with its origin (the runtime gathers them where the reducer can). This
        rank's decode peers are told that cause instead of "failed on another rank", so a
        cause seen only on a rank that tells decode nothing still reaches decode."""
        group_causes = group_causes or {}
        for room in step.finished:
            self._drop(room)
        out: list[Decision] = []
        for failed in step.aborted:
            room = failed.room
            # Who hears why (rule 7): the decode ranks it is bound to or, not bound yet, those
            # whose metadata came (bad metadata too); each waits on this rank for the room,
            # and an AbortAck alone does not end a live room on decode.
            asked = {*self._metadata.get(room, {}), *self._rejected.get(room, ())}
            peers = tuple(p for p, _ in self._targets.get(room, ())) or tuple(
                self.decode_peers[k] for k in sorted(asked, key=repr)
            )
            # Everyone who may be waiting on this room: its metadata senders and aborters.
            told = {k: self.decode_peers[k] for k in sorted(asked, key=repr)}
            for k in self._abort_senders.get(room, ()):
                told[k] = self.decode_peers[k]
            if failed.from_other_rank:
                bound = room in self._targets
                self._followed[room] = frozenset(self._metadata.get(room, ())) if bound else None
                if len(self._followed) > MAX_FOLLOWED:
                    del self._followed[next(iter(self._followed))]
            self._drop(room)
            cause = group_causes.get(room) if failed.from_other_rank else failed.reason
            self._ended[room] = (now, cause)
            if self.authoritative:
                out.append(StopSending(room, failed.reason))
                # Cleared, and acknowledged to decode, only once no write can land (rule 8).
                self._draining[room] = told
                if peers:
                    out.append(Tell(room, peers, False, cause))
        return out

    def take_late_causes(self) -> tuple[LateCause, ...]:
        """Decode root causes for rooms this rank aborted as "failed on another rank"."""
        late, self._late = tuple(self._late), []
        return late

    def _drop(self, room: int) -> None:
        self._abort_senders.pop(room, None)
        self._rejected.pop(room, None)
        self._metadata.pop(room, None)
        self._targets.pop(room, None)
        self._announced.discard(room)

    # -- what the session asks -----------------------------------------------------------------

    def targets(self, room: int) -> tuple[tuple[DecodePeer, DecodeMetadata], ...] | None:
        """The decode ranks ``room`` is bound to, with their metadata (None: not bound yet)."""
        return self._targets.get(room)

    def requested_pages(self, room: int) -> int | None:
        """How many pages decode allocated for ``room`` (None before its metadata arrived)."""
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
        return len(self._draining)

    def rooms_held(self) -> set[int]:
        """Every room this rank still keeps anything for: queued, early, bound, draining,
        ended or followed. Empty once every room ended and its memory here expired (read-only;
        for leak checks)."""
        held = {int(r) for r in self.queue.rooms.tolist()}
        held.update(self.early)
        for table in (
            self._metadata,
            self._targets,
            self._announced,
            self._draining,
            self._abort_senders,
            self._rejected,
            self._ended,
            self._followed,
            self.queue.reasons,
        ):
            held.update(table)
        held.update(c.room for c in self._late)
        return held


def same_metadata(a: DecodeMetadata, b: DecodeMetadata) -> bool:
    return (
        a.aux_slot == b.aux_slot
        and a.expected == b.expected
        and a.page_slice == b.page_slice
        and a.writes == b.writes
        and np.array_equal(a.pages, b.pages)
    )


def metadata_problem(
    meta: DecodeMetadata,
    peer: DecodePeer,
    kv_regions: tuple[MemoryRegion, ...],
    aux_regions: tuple[MemoryRegion, ...] = (),
) -> str | None:
    """Why ``meta`` cannot be written into ``peer``'s registered memory, or None if it can."""
    if not meta.writes:
        return None
    bounds = peer.bounds
    pages = meta.pages
    if bounds.kv_pages is not None and len(pages):
        highest = int(pages.max())
        if highest >= bounds.kv_pages:
            return f"page {highest} is out of range (decode registered {bounds.kv_pages} pages)"
    if bounds.aux_rows is None:
        return "decode registered no aux rows"
    if not 0 <= meta.aux_slot < bounds.aux_rows:
        return (
            f"aux slot {meta.aux_slot} is out of range (decode registered {bounds.aux_rows} rows)"
        )
    # A whole row is copied: a shorter decode row would be overrun (another slot, or past it).
    mine = tuple(r.item_bytes for r in aux_regions)
    if mine and mine != bounds.aux_row_bytes:
        return (
            f"decode registered aux rows of {list(bounds.aux_row_bytes)} bytes, this prefill "
            f"writes rows of {list(mine)}"
        )
    if meta.page_slice is not None and bounds.kv_page_bytes is not None and kv_regions:
        src_offset, dst_offset, length = meta.page_slice
        src_page = min(r.item_bytes for r in kv_regions)
        dst_page = bounds.kv_page_bytes
        if length <= 0 or src_offset + length > src_page or dst_offset + length > dst_page:
            return (
                f"page slice (src {src_offset}, dst {dst_offset}, {length} bytes) does not "
                f"fit pages of {src_page} / {dst_page} bytes"
            )
    return None
