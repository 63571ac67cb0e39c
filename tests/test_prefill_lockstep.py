"""N in-process prefill ranks with a fake MIN reducer, under hypothesis-generated schedules.

The prefill twin of ``test_queue_lockstep.py``. Every rank has its own
:class:`~kvbridge.protocol.prefill_rooms.PrefillRooms` and is driven exactly as
:class:`~kvbridge.runtime.prefill_session.PrefillSession` drives it: the engine's adds and
aborts and the forward pass's sends (the same on every rank, in the same step), then the
messages that reached this rank, ``expire``, ``drained``, the transport's poll, ``announce`` and
``local_statuses``; then the MIN over the ranks, ``take_late_causes``, ``apply`` and ``finish``.
What differs per rank is timing: decode's messages for a room reach rank ``r`` ``skew`` steps
later than rank 0 (before the engine's add, too), in any order; a transport write completes or
fails on one rank; drains are confirmed late, or cannot be told at all (API 1.0).

Properties (README, the nine rules), in every run:

1. lock-step: every rank ends each room in the same step the same way, and the queues match
   after every step (the collective never sees vectors of different lengths);
2. nothing leaks: once every room ended, drained and expired, no rank holds any room
   (``PrefillRooms.rooms_held``);
3. the fence (rule 8): no AbortAck while a write of the room may land, nothing cleared before
   the transport confirmed it, no sender started for a room already failed or aborted;
4. root causes (rule 7): each rank tells its own cause, or None where it only followed; a
   cause prefill saw itself reaches a decode rank that asked; a decode root cause arriving
   after a rank ended the room as "followed" comes back once from ``take_late_causes``;
5. trust (rule 9): forged messages (unregistered senders, prefill-role messages, a second
   registration, strangers and re-pointing once bound) are refused, counted, and change
   nothing: a twin of each rank that never sees them decides exactly the same; legitimate
   messages are never refused.

The plain tests at the end pin the defects the property test found.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import attrs
import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from kvbridge.protocol.columns import BOOTSTRAPPING, FAILED, SUCCESS, TRANSFERRING, WAITING
from kvbridge.protocol.messages import (
    Abort,
    AbortAck,
    Heartbeat,
    Message,
    Metadata,
    Register,
    Status,
    Waiting,
)
from kvbridge.protocol.outcomes import FROM_OTHER_RANK, LateCause, PrefillStep
from kvbridge.protocol.prefill import PrefillRequest
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

DT = 0.5  # seconds of fake clock per step
BOOT, WAIT = 4.0, 3.0  # bootstrap_timeout, waiting_timeout: 8 and 6 steps
TTL_STEPS = int((BOOT + WAIT) / DT)  # how long an ended room is remembered
NEVER = 10**9
PAGE = 4096
KV = ((1 << 20, 16 * PAGE, PAGE, "cpu"),)  # 16 pages
AUX = ((1 << 30, 8 * 64, 64, "cpu"),)
STRANGER = "dx"  # registered with every prefill rank, decode rank of no room
GHOST = "ghost"  # never registered
FORGERIES = (
    "ghost_meta",
    "ghost_abort",
    "ghost_waiting",
    "status",
    "abort_ack",
    "heartbeat",
    "reregister",
    "stranger_meta",  # only once the room is bound on that rank
    "stranger_abort",  # idem
    "changed_meta",  # idem: a room's own decode rank tries to re-point it
)


@attrs.frozen
class RoomPlan:
    room: int
    add_at: int | None  # None: the engine never adds it
    engine_abort_at: int | None
    meta_at: dict[str, int | None]  # per decode rank; None: never sent
    bad_meta: dict[str, bool]  # pages out of the registered range
    resend: dict[str, bool]  # the same metadata again, later
    leases: dict[str, tuple[int, ...]]
    decode_abort: tuple[int, dict[str, bool]] | None  # step, root cause per decode rank
    skew: tuple[int, ...]  # per prefill rank, rank 0 first (0)
    done_after: tuple[int, ...]  # per prefill rank: steps from the send to its Success
    transport_fail: tuple[int, int] | None  # (rank, step)
    drain_after: tuple[int, ...]  # per prefill rank: steps from StopSending to confirmed


@attrs.frozen
class Scenario:
    world: int
    decode: tuple[str, ...]
    authoritative: tuple[bool, ...]
    serves: tuple[tuple[str, ...], ...]  # per prefill rank: the decode ranks it serves
    writes: dict[tuple[int, str], bool]
    cannot_tell: tuple[bool, ...]  # per prefill rank: transport without sender_drained
    rooms: tuple[RoomPlan, ...]
    # per rank: (arrival step, kind, room, decode key, payload), in arrival order
    inbox: tuple[tuple[tuple[int, str, int, str, Any], ...], ...]
    forged: tuple[tuple[int, int, int, str], ...]  # (step, rank, room, kind)


def meta_of(room: int, key: str, expected: int, writes: bool, bad: bool) -> Metadata:
    pages = np.array([99]) if bad else np.arange(2)
    return Metadata(room, key, pages, 0, expected, (0, 0, PAGE) if writes else None)


def rarely(draw: st.DrawFn, strategy: st.SearchStrategy[Any], one_in: int) -> Any:
    """A draw from ``strategy`` about once in ``one_in`` examples, else None (shrinks to None)."""
    return draw(strategy) if draw(st.integers(1, one_in)) == one_in else None


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    world = draw(st.integers(1, 4))
    decode = tuple(f"d{i}" for i in range(draw(st.integers(1, 3))))
    authoritative = (
        True,
        *(draw(st.sampled_from([True, True, True, False])) for _ in range(world - 1)),
    )
    serves = tuple(
        tuple(sorted(draw(st.sets(st.sampled_from(decode), min_size=1)))) for _ in range(world)
    )
    writes = {
        (r, d): draw(st.sampled_from([True, True, True, False]))
        for r in range(world)
        for d in serves[r]
    }
    cannot_tell = tuple(draw(st.sampled_from([False, False, True])) for _ in range(world))
    steps = st.integers(0, 14)
    rooms = []
    for room in range(1, draw(st.integers(1, 4)) + 1):
        add_at = None if rarely(draw, st.just(1), 6) else draw(st.integers(0, 8))
        # Decode sends its metadata about when the engine adds the room: before it (early),
        # or late enough, with the skew, that bootstrap_timeout fails it.
        base = add_at or 0
        near = st.integers(max(0, base - 3), base + 5)
        rooms.append(
            RoomPlan(
                room=room,
                add_at=add_at,
                engine_abort_at=rarely(draw, steps, 5),
                # Metadata that never comes: the room times out (a lease may hold it longer).
                meta_at={d: None if rarely(draw, st.just(1), 8) else draw(near) for d in decode},
                bad_meta={d: draw(st.sampled_from([False] * 7 + [True])) for d in decode},
                resend={d: draw(st.booleans()) for d in decode},
                leases={d: tuple(draw(st.lists(st.integers(0, 16), max_size=2))) for d in decode},
                decode_abort=rarely(
                    draw,
                    st.tuples(
                        st.integers(0, 16),
                        st.fixed_dictionaries({d: st.booleans() for d in decode}),
                    ),
                    4,
                ),
                skew=(0, *(draw(st.integers(0, 5)) for _ in range(world - 1))),
                # NEVER: the write is never confirmed, waiting_timeout fails it on that rank.
                done_after=tuple(
                    NEVER if rarely(draw, st.just(1), 10) else draw(st.integers(0, 4))
                    for _ in range(world)
                ),
                transport_fail=rarely(
                    draw, st.tuples(st.integers(0, world - 1), st.integers(0, 20)), 4
                ),
                drain_after=tuple(draw(st.integers(0, 3)) for _ in range(world)),
            )
        )
    inbox = []
    for r in range(world):
        mine: list[tuple[int, str, int, str, Any]] = []
        for p in rooms:
            lag = p.skew[r]
            for d in serves[r]:
                expected = len(serves[r])
                sent = p.meta_at[d]
                if sent is not None:
                    meta = meta_of(p.room, d, expected, writes[(r, d)], p.bad_meta[d])
                    mine.append((sent + lag, "meta", p.room, d, meta))
                    if p.resend[d]:
                        mine.append((sent + lag + 2, "meta", p.room, d, meta))
                for t in p.leases[d]:
                    mine.append((t + lag, "waiting", p.room, d, None))
                if p.decode_abort is not None:
                    t, roots = p.decode_abort
                    cause = "client gone" if roots[d] else None
                    mine.append((t + lag, "abort", p.room, d, cause))
        # Any order within a step: a permutation, then a stable sort by arrival.
        mine = draw(st.permutations(mine))
        inbox.append(tuple(sorted(mine, key=lambda m: m[0])))
    forged = tuple(
        draw(
            st.lists(
                st.tuples(
                    st.integers(0, 20),
                    st.integers(0, world - 1),
                    st.integers(1, len(rooms)),
                    st.sampled_from(FORGERIES),
                ),
                max_size=3,
            )
        )
    )
    return Scenario(
        world,
        decode,
        authoritative,
        serves,
        writes,
        cannot_tell,
        tuple(rooms),
        tuple(inbox),
        forged,
    )


def fake_reduce(vectors: list[np.ndarray]) -> np.ndarray:
    lengths = {len(v) for v in vectors}
    assert len(lengths) == 1, f"collective with mismatched sizes {lengths}: gloo would fail"
    return np.minimum.reduce(vectors)


def register(key: str, memory: str | None = None) -> Register:
    return Register(key, {"id": memory or key}, KV, AUX, f"tcp://{key}:1")


@attrs.define
class Rank:
    """One prefill rank: its machine, a twin that never sees forged messages, and what the
    runtime would have done with their decisions."""

    r: int
    rooms: PrefillRooms
    twin: PrefillRooms | None
    writing: set[int] = attrs.Factory(set)  # sender initialised, not yet finished or drained
    stopped: dict[int, int] = attrs.Factory(dict)  # room -> step of StopSending
    aborted_seen: set[int] = attrs.Factory(set)  # an accepted abort or StopSending
    quiet: set[int] = attrs.Factory(set)  # rooms the transport just confirmed drained
    sent_at: dict[int, int] = attrs.Factory(dict)  # the forward pass's (last) send
    tells: list[tuple[int, Tell]] = attrs.Factory(list)
    acks: list[tuple[int, Acknowledge]] = attrs.Factory(list)
    late: list[tuple[int, LateCause]] = attrs.Factory(list)
    ended: dict[int, tuple[int, str, bool, str]] = attrs.Factory(dict)  # step, outcome, ...
    arrived: list[tuple[int, str, int, str, Any]] = attrs.Factory(list)  # as delivered


class Sim:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        twin = bool(sc.forged)
        self.ranks = [
            Rank(
                r,
                self._machine(sc.authoritative[r]),
                self._machine(sc.authoritative[r]) if twin else None,
            )
            for r in range(sc.world)
        ]
        self.plans = {p.room: p for p in sc.rooms}
        for rank in self.ranks:
            for key in (*sc.decode, STRANGER):
                self.call(rank, "on_message", register(key), 0.0)
        self.step = 0
        self.calling = ""
        self.cursor = [0] * sc.world
        self.ready: tuple[int, ...] = ()

    @staticmethod
    def _machine(authoritative: bool) -> PrefillRooms:
        return PrefillRooms(
            authoritative=authoritative, bootstrap_timeout=BOOT, waiting_timeout=WAIT
        )

    # -- calls on a rank, mirrored on its twin ------------------------------------------------

    def call(self, rank: Rank, name: str, *args: Any) -> list[Decision]:
        self.calling = name
        out = getattr(rank.rooms, name)(*args)
        if rank.twin is not None:
            assert getattr(rank.twin, name)(*args) == out, (
                f"rank {rank.r}: a forgery changed {name}"
            )
        refused = [d for d in out if isinstance(d, Refused)]
        assert not refused, f"rank {rank.r}: legitimate {name}{args} refused: {refused}"
        self.perform(rank, out)
        return out

    def forge(self, rank: Rank, room: int, kind: str, now: float) -> None:
        m = rank.rooms
        targets = m.targets(room)
        message: Message
        if kind == "ghost_meta":
            message = meta_of(room, GHOST, 1, True, False)
        elif kind == "ghost_abort":
            message = Abort.of(room, GHOST, "forged")
        elif kind == "ghost_waiting":
            message = Waiting(GHOST, np.array([room], dtype=np.uint64))
        elif kind == "status":
            message = Status(room, "p9", True)
        elif kind == "abort_ack":
            message = AbortAck(room, "p9")
        elif kind == "heartbeat":
            message = Heartbeat("p9")
        elif kind == "reregister":
            message = register(self.sc.decode[0], memory="elsewhere")
        elif targets is None:
            return  # before binding these are allowed (the first complete set binds)
        elif kind == "stranger_meta":
            message = meta_of(room, STRANGER, 1, True, False)
        elif kind == "stranger_abort":
            message = Abort.of(room, STRANGER, "forged")
        else:
            _, meta = targets[0]
            message = Metadata(room, meta.decode_rank, np.arange(3) + 5, 1, meta.expected, None)
        before = m.untrusted
        out = m.on_message(message, now)
        assert len(out) == 1 and isinstance(out[0], Refused), f"{kind} not refused: {out}"
        assert m.untrusted == before + 1

    # -- what the runtime does with decisions --------------------------------------------------

    def perform(self, rank: Rank, decisions: list[Decision]) -> None:
        for d in decisions:
            assert not isinstance(d, Evicted)  # far below capacity
            if isinstance(d, Tell):
                rank.tells.append((self.step, d))
            elif isinstance(d, Acknowledge):
                # Rule 8: no AbortAck while a write of the room may still land.
                assert d.room not in rank.writing, (
                    f"rank {rank.r}: room {d.room} acknowledged before it drained"
                )
                rank.acks.append((self.step, d))
            elif isinstance(d, StartSending):
                assert rank.rooms.authoritative
                q = rank.rooms.queue
                i = q.cols.index_of(d.room)
                # Checked after the call, so only for a call about one message: ``add`` pops
                # a room's early messages, and one after the metadata may fail it.
                assert self.calling == "add" or q.cols.local[i] != FAILED, (
                    f"rank {rank.r}: sender of room {d.room} started for a failed room"
                )
                assert d.room not in rank.aborted_seen, (
                    f"rank {rank.r}: sender of room {d.room} started after its abort"
                )
                rank.writing.add(d.room)
            elif isinstance(d, StopSending):
                assert d.room not in rank.stopped
                rank.stopped[d.room] = self.step
                rank.aborted_seen.add(d.room)
            elif isinstance(d, Drained):
                assert d.room in rank.stopped and d.room in rank.quiet, (
                    f"rank {rank.r}: room {d.room} cleared before the transport drained it"
                )
                rank.writing.discard(d.room)
            else:
                assert isinstance(d, Expired)

    # -- one step, as PrefillSession.step ------------------------------------------------------

    def run_step(self) -> None:
        sc, step = self.sc, self.step
        now = step * DT
        # The engine, the same on every rank: the forward pass for last step's ready rooms,
        # adds, aborts.
        for rank in self.ranks:
            q = rank.rooms.queue
            for room in self.ready:
                i = q.cols.index_of(room)
                if i is None or q.cols.local[i] == FAILED:
                    continue  # as PrefillSession.send: aborted meanwhile
                if rank.rooms.authoritative:
                    assert rank.rooms.targets(room) is not None
                rank.sent_at[room] = step
                q.sent(room, True, now)
                if rank.twin is not None:
                    rank.twin.queue.sent(room, True, now)
            adds = [
                PrefillRequest(p.room)
                for p in sc.rooms
                if p.add_at == step and not self._engine_aborted_before_add(p)
            ]
            if adds:
                self.call(rank, "add", adds, now)
            for p in sc.rooms:
                if p.engine_abort_at == step:
                    self.call(rank, "engine_abort", p.room, "client gone on prefill", now)
                    rank.aborted_seen.add(p.room)
        self.ready = ()
        local = []
        for rank in self.ranks:
            self.deliver(rank, now)
            self.call(rank, "expire", now)
            m = rank.rooms
            if m.draining:
                draining = m.draining_rooms()
                if sc.cannot_tell[rank.r]:
                    confirmed = None
                else:
                    confirmed = np.array(
                        [
                            step >= rank.stopped[room] + self.plans[room].drain_after[rank.r]
                            for room in draining.tolist()
                        ],
                        dtype=bool,
                    )
                # What the transport says is quiet; an API 1.0 one cannot tell, which counts
                # as drained at once (``PrefillRooms.drained``: the guarantee it never gave).
                quiet = draining if confirmed is None else draining[confirmed]
                rank.quiet = set(quiet.tolist())
                self.call(rank, "drained", draining, confirmed)
                rank.quiet = set()
            if not len(m.queue):
                local.append(np.zeros(0, dtype=np.uint8))
                continue
            if not m.authoritative:
                statuses = np.full(len(m.queue), SUCCESS, dtype=np.uint8)
                failures: dict[int, str] = {}
            else:
                statuses, failures = self.poll(rank)
                self.call(rank, "announce", statuses)
            v = m.queue.local_statuses(statuses, failures, now)
            if rank.twin is not None:
                assert np.array_equal(rank.twin.queue.local_statuses(statuses, failures, now), v)
            local.append(v)
        reduced = fake_reduce(local)
        steps = []
        for rank in self.ranks:
            late = rank.rooms.take_late_causes()
            if rank.twin is not None:
                assert rank.twin.take_late_causes() == late
            rank.late += [(step, c) for c in late]
            if not len(reduced):
                continue
            result = rank.rooms.queue.apply(reduced.copy())
            if rank.twin is not None:
                assert rank.twin.queue.apply(reduced.copy()) == result
            for room in result.finished:
                rank.writing.discard(room)  # every write landed: sender_clear
            self.call(rank, "finish", result, now)
            self.record(rank, result)
            steps.append(result)
        if steps:
            first = steps[0]
            for s in steps[1:]:
                assert s.ready == first.ready and s.finished == first.finished
                assert [a.room for a in s.aborted] == [a.room for a in first.aborted]
            self.ready = first.ready
        for rank in self.ranks[1:]:
            assert np.array_equal(rank.rooms.queue.rooms, self.ranks[0].rooms.queue.rooms)
        self.step += 1

    def _engine_aborted_before_add(self, p: RoomPlan) -> bool:
        return (
            p.engine_abort_at is not None and p.add_at is not None and p.engine_abort_at < p.add_at
        )

    def deliver(self, rank: Rank, now: float) -> None:
        box = self.sc.inbox[rank.r]
        while self.cursor[rank.r] < len(box) and box[self.cursor[rank.r]][0] <= self.step:
            _, kind, room, key, payload = box[self.cursor[rank.r]]
            self.cursor[rank.r] += 1
            rank.arrived.append((self.step, kind, room, key, payload))
            if kind == "meta":
                self.call(rank, "on_message", payload, now)
            elif kind == "waiting":
                self.call(rank, "on_message", Waiting(key, np.array([room], dtype=np.uint64)), now)
            else:
                queued = rank.rooms.queue.cols.index_of(room) is not None
                self.call(rank, "on_message", Abort.of(room, key, payload), now)
                if queued:
                    rank.aborted_seen.add(room)
        for step, r, room, kind in self.sc.forged:
            if step == self.step and r == rank.r:
                self.forge(rank, room, kind, now)

    def poll(self, rank: Rank) -> tuple[np.ndarray, dict[int, str]]:
        """The transport's view (``sender_poll``) of the queued rooms on this rank."""
        rooms = rank.rooms.queue.rooms.tolist()
        statuses = np.empty(len(rooms), dtype=np.uint8)
        failures = {}
        for i, room in enumerate(rooms):
            p = self.plans[room]
            fail = p.transport_fail
            if fail is not None and fail[0] == rank.r and self.step >= fail[1]:
                statuses[i] = FAILED
                failures[room] = f"transport error on prefill rank {rank.r}"
            elif room not in rank.writing:
                statuses[i] = BOOTSTRAPPING
            elif room not in rank.sent_at:
                statuses[i] = WAITING
            elif self.step < rank.sent_at[room] + p.done_after[rank.r]:
                statuses[i] = TRANSFERRING
            else:
                statuses[i] = SUCCESS
        return statuses, failures

    def record(self, rank: Rank, result: PrefillStep) -> None:
        for room in result.finished:
            assert room not in rank.ended
            rank.ended[room] = (self.step, "success", False, "")
        for a in result.aborted:
            assert a.room not in rank.ended
            assert a.from_other_rank == (a.reason == FROM_OTHER_RANK)
            rank.ended[a.room] = (self.step, "failed", a.from_other_rank, a.reason)


def last_event(sc: Scenario) -> int:
    times = [m[0] for box in sc.inbox for m in box] + [f[0] for f in sc.forged]
    for p in sc.rooms:
        times += [t for t in (p.add_at, p.engine_abort_at) if t is not None]
    return max(times, default=0)


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_prefill_ranks_stay_in_lock_step(sc: Scenario) -> None:
    sim = Sim(sc)
    horizon = last_event(sc) + TTL_STEPS + int(BOOT / DT) + 10
    while sim.step < horizon:
        sim.run_step()
    ranks = sim.ranks
    added = {
        p.room for p in sc.rooms if p.add_at is not None and not sim._engine_aborted_before_add(p)
    }

    # 1. Lock-step: every added room ended once, in the same step, the same way, everywhere.
    for room in added:
        outcomes = {
            (rank.ended[room][0], rank.ended[room][1]) for rank in ranks if room in rank.ended
        }
        assert all(room in rank.ended for rank in ranks), f"room {room} never ended"
        assert len(outcomes) == 1, f"room {room} ended differently: {outcomes}"
    for rank in ranks:
        assert set(rank.ended) == added

    # 2. Nothing left behind.
    for rank in ranks:
        m = rank.rooms
        assert len(m.queue) == 0 and not m.queue.reasons
        assert len(m.early) == 0
        assert m.draining == 0 and not len(m.draining_rooms())
        assert m.live_decode_controls() == set()
        assert m.take_late_causes() == ()
        for p in sc.rooms:
            assert m.targets(p.room) is None and m.requested_pages(p.room) is None
        assert not rank.writing

    # 3. The fence is checked as decisions are performed (Sim.perform); every abort drained.
    for rank in ranks:
        if rank.rooms.authoritative:
            failed = {room for room, e in rank.ended.items() if e[1] == "failed"}
            assert set(rank.stopped) == failed

    for rank in ranks:
        assert rank.rooms.rooms_held() == set(), f"rank {rank.r} still holds rooms"
    for rank in ranks:  # what the runs covered: pytest --hypothesis-show-statistics
        for _, outcome, followed, _ in rank.ended.values():
            event(f"outcome {outcome} followed={followed}")
        event(f"late causes {bool(rank.late)}")
        event(f"acknowledged {bool(rank.acks)}")
        event(f"told ok {any(t.ok for _, t in rank.tells)}")
        event(f"told failed {any(not t.ok for _, t in rank.tells)}")
        event(f"refused {rank.rooms.untrusted}")

    # 4. Root causes.
    for room in added:
        step, outcome, _, _ = ranks[0].ended[room]
        if outcome != "failed":
            continue
        for rank in ranks:
            _, _, followed, reason = rank.ended[room]
            for _, tell in rank.tells:
                if tell.room == room and not tell.ok:
                    assert tell.reason != FROM_OTHER_RANK
                    # Its own cause, or None where it only followed: never an echo.
                    assert tell.reason == (None if followed else reason), (
                        f"rank {rank.r} told {tell.reason!r} for room {room}, its own cause "
                        f"{reason!r} (followed {followed})"
                    )
    for room in added:
        step, outcome, _, _ = ranks[0].ended[room]
        if outcome != "failed":
            continue
        # A cause prefill saw itself (not one decode sent: decode has that) reaches decode
        # from a rank that had someone to tell: one that accepted metadata for the room.
        told = [t for rank in ranks for s, t in rank.tells if t.room == room and not t.ok]
        asked = [
            rank
            for rank in ranks
            if rank.rooms.authoritative
            and any(a[1] == "meta" and a[2] == room and a[0] <= step for a in rank.arrived)
        ]
        own = [
            rank
            for rank in asked
            if not rank.ended[room][2] and not rank.ended[room][3].startswith("decode aborted")
        ]
        if own:
            assert any(t.reason is not None for t in told), (
                f"room {room}: root cause {own[0].ended[room][3]!r} of rank {own[0].r} "
                f"reached no decode rank; told {told}"
            )

    # A decode root cause reaching a rank after it ended the room as "followed" is kept once.
    for rank in ranks:
        late = defaultdict(list)
        for s, cause in rank.late:
            late[cause.room].append((s, cause.reason))
        for room, causes in late.items():
            assert len(causes) == 1, f"rank {rank.r}: room {room} late causes {causes}"
        for room, (end, outcome, followed, _) in rank.ended.items():
            roots = [
                (a[0], f"decode aborted: decode {a[3]}: {a[4]}")
                for a in rank.arrived
                if a[1] == "abort" and a[2] == room and a[4] is not None and a[0] > end
            ]
            if not (outcome == "failed" and followed):
                assert room not in late, f"rank {rank.r}: late cause for room {room}"
            elif roots and roots[0][0] - end < TTL_STEPS - 1:
                assert late.get(room) == [roots[0]], (
                    f"rank {rank.r}: late root cause of room {room} lost: {roots} {late}"
                )
            elif not roots:
                assert room not in late


def test_a_non_authoritative_rank_refuses_metadata_from_an_unregistered_sender() -> None:
    """Rule 9 counts a forgery the same on every rank: a no-op CP rank ignores metadata, but
    one from a rank that never registered is still refused and counted, as it is for a room
    not queued yet (found by the property test above)."""
    rooms = PrefillRooms(authoritative=False, bootstrap_timeout=BOOT, waiting_timeout=WAIT)
    rooms.add([PrefillRequest(1)], 0.0)
    (refused,) = rooms.on_message(meta_of(1, GHOST, 1, True, False), 0.0)
    assert isinstance(refused, Refused) and rooms.untrusted == 1
    (early,) = rooms.on_message(meta_of(2, GHOST, 1, True, False), 0.0)  # not queued yet
    assert isinstance(early, Refused) and rooms.untrusted == 2


def test_metadata_after_an_abort_in_the_same_step_binds_but_starts_no_sender() -> None:
    """The engine aborts room 1, then (same step, before the reduction) d0's metadata
    arrives: the room is doomed, so no sender is initialised for it (nothing must start after
    an abort); it is still bound, so d0 hears why at the finish and is acknowledged once the
    transport drained (found by the property test above)."""
    rooms = PrefillRooms(authoritative=True, bootstrap_timeout=BOOT, waiting_timeout=WAIT)
    rooms.on_message(register("d0"), 0.0)
    peer = rooms.decode_peers["d0"]
    rooms.add([PrefillRequest(1)], 0.0)
    assert rooms.engine_abort(1, "client gone", 0.0) == []
    assert rooms.on_message(meta_of(1, "d0", 1, True, False), 0.0) == []
    assert rooms.targets(1) is not None
    q = rooms.queue
    step = q.apply(q.local_statuses(np.array([WAITING], dtype=np.uint8), {}, 0.0))
    assert [a.room for a in step.aborted] == [1]
    assert rooms.finish(step, 0.0) == [
        StopSending(1, "client gone"),
        Tell(1, (peer,), False, "client gone"),
    ]
    assert rooms.drained(rooms.draining_rooms(), np.array([True])) == [
        Drained(1),
        Acknowledge(1, (peer,)),
    ]


def test_early_metadata_after_an_early_abort_starts_no_sender_at_the_add() -> None:
    """As above, for messages that came before the engine's add: ``add`` takes them in
    arrival order, the abort first, so the metadata that completes the room finds it failed.
    The abort was acknowledged at once (nothing of the room was being written): a sender
    started after that would write under a lifted fence."""
    rooms = PrefillRooms(authoritative=True, bootstrap_timeout=BOOT, waiting_timeout=WAIT)
    rooms.on_message(register("d0"), 0.0)
    d0 = rooms.decode_peers["d0"]
    assert rooms.on_message(Abort.of(1, "d0", "client gone"), 0.0) == [Acknowledge(1, (d0,))]
    assert rooms.on_message(meta_of(1, "d0", 1, True, False), 0.0) == []
    assert rooms.add([PrefillRequest(1)], 0.1) == []
    assert rooms.targets(1) is not None


def test_a_followed_room_is_forgotten_with_the_ended_room() -> None:
    """A room this rank only followed is remembered, for a late decode root cause, as long
    as the room itself (``ended_ttl``); a root cause after that has no ended room to attach
    to, so keeping the entry longer only held memory (found by the property test above)."""
    rooms = PrefillRooms(authoritative=True, bootstrap_timeout=BOOT, waiting_timeout=WAIT)
    rooms.on_message(register("d0"), 0.0)
    rooms.add([PrefillRequest(1)], 0.0)
    q = rooms.queue
    step = q.apply(np.array([FAILED], dtype=np.uint8))  # the MIN: another rank failed it
    (aborted,) = step.aborted
    assert aborted.from_other_rank
    rooms.finish(step, 0.0)
    rooms.drained(rooms.draining_rooms(), np.array([True]))
    assert rooms.rooms_held() == {1}  # ended, followed: a late cause would be kept
    rooms.expire(BOOT + WAIT + 1.0)
    assert rooms.rooms_held() == set()


def test_a_room_that_fails_before_it_is_bound_tells_the_decode_ranks_that_asked() -> None:
    """Rule 7: d0's metadata is here, d1's never came, and the room times out. d0 waits on
    this rank for the room; it must hear the root cause now, not only an AbortAck (which does
    not end a live room on decode), so it does not hold its pages until its own timeout and
    the cause it logs is this one (found by the property test above)."""
    rooms = PrefillRooms(authoritative=True, bootstrap_timeout=BOOT, waiting_timeout=WAIT)
    for key in ("d0", "d1"):
        rooms.on_message(register(key), 0.0)
    rooms.add([PrefillRequest(1)], 0.0)
    assert rooms.on_message(meta_of(1, "d0", 2, True, False), 0.0) == []
    q = rooms.queue
    step = q.apply(q.local_statuses(np.array([BOOTSTRAPPING]), {}, BOOT + 1.0))
    (aborted,) = step.aborted
    assert "never sent metadata" in aborted.reason
    d0 = rooms.decode_peers["d0"]
    assert rooms.finish(step, BOOT + 1.0) == [
        StopSending(1, aborted.reason),
        Tell(1, (d0,), False, aborted.reason),
    ]
    assert rooms.drained(rooms.draining_rooms(), np.array([True])) == [
        Drained(1),
        Acknowledge(1, (d0,)),
    ]


def test_the_sender_of_bad_metadata_hears_why_its_room_failed() -> None:
    """Rule 7: d0's metadata names a page past its registered memory, which fails the room
    here; d0 waits on this rank for the room all the same, so it is told the cause (and
    acknowledged once drained) instead of timing out with a cause of its own (found by the
    property test above)."""
    rooms = PrefillRooms(authoritative=True, bootstrap_timeout=BOOT, waiting_timeout=WAIT)
    rooms.on_message(register("d0"), 0.0)
    rooms.add([PrefillRequest(1)], 0.0)
    assert rooms.on_message(meta_of(1, "d0", 1, True, bad=True), 0.0) == []
    assert rooms.targets(1) is None
    q = rooms.queue
    step = q.apply(q.local_statuses(np.array([BOOTSTRAPPING]), {}, 0.0))
    (aborted,) = step.aborted
    assert "page 99 is out of range" in aborted.reason
    d0 = rooms.decode_peers["d0"]
    assert rooms.finish(step, 0.0) == [
        StopSending(1, aborted.reason),
        Tell(1, (d0,), False, aborted.reason),
    ]
    assert rooms.drained(rooms.draining_rooms(), np.array([True])) == [
        Drained(1),
        Acknowledge(1, (d0,)),
    ]
