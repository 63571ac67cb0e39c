"""N in-process decode ranks with a fake MIN reducer, under hypothesis-generated schedules.

Each rank sees its own timing (prefill DP rank resolved, completion message, room stamp landing,
transport errors) but the same adds. After every step all ranks must hold identical queues and
have made identical decisions; at the end every request ended exactly once and every pool is
full again.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge import AuxLayout, AuxSlotPool, PagePool
from kvbridge.errors import DoubleFreeError
from kvbridge.protocol.decode import DecodeQueue, DecodeRequest
from kvbridge.status import KVPoll

NUM_PAGES, NUM_SLOTS = 24, 6
DT = 0.1  # seconds of fake clock per step
NEVER = 10**9


@attrs.define
class RoomPlan:
    """When things happen for one room on one rank, in steps after the relevant event."""

    resolve_after: int  # steps after add; NEVER = DP resolution never finishes
    complete_after: int  # steps after metadata was sent
    stamp_after: int  # steps after metadata was sent; NEVER = aux row never lands
    error_at: int  # absolute step of a transport error; NEVER = none


@attrs.define
class Rank:
    queue: DecodeQueue
    pages: PagePool
    slots: AuxSlotPool
    aux: np.ndarray
    sent_at: dict[int, int] = attrs.Factory(dict)
    resolved: set[int] = attrs.Factory(set)


def make_rank() -> Rank:
    aux = AuxLayout().allocate(NUM_SLOTS)
    pages, slots = PagePool(NUM_PAGES), AuxSlotPool(aux["room"])
    queue = DecodeQueue(pages, slots, aux, bootstrap_timeout=3.0, waiting_timeout=2.0)
    return Rank(queue, pages, slots, aux)


def fake_reduce(vectors: list[np.ndarray]) -> np.ndarray:
    lengths = {len(v) for v in vectors}
    assert len(lengths) == 1, f"collective with mismatched sizes {lengths}: gloo would fail"
    return np.minimum.reduce(vectors)


delays = st.integers(0, 6)
plans = st.builds(
    RoomPlan,
    resolve_after=st.one_of(delays, delays, delays, st.just(NEVER)),
    complete_after=delays,
    stamp_after=st.one_of(delays, delays, delays, st.just(NEVER)),
    error_at=st.one_of(st.just(NEVER), st.just(NEVER), st.integers(0, 40)),
)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, list[list[DecodeRequest]], dict]:
    world = draw(st.integers(2, 8))
    batches = draw(st.lists(st.lists(st.integers(0, 10), max_size=4), min_size=1, max_size=12))
    room = 0
    adds = []
    for batch in batches:
        reqs = []
        for num_pages in batch:
            room += 1
            reqs.append(DecodeRequest(room=room, num_pages=num_pages))
        adds.append(reqs)
    plan = {(r, req.room): draw(plans) for r in range(world) for batch in adds for req in batch}
    return world, adds, plan


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_ranks_stay_in_lock_step_and_every_request_ends_once(schedule) -> None:
    world, adds, plan = schedule
    ranks = [make_rank() for _ in range(world)]
    ended: dict[int, list] = {}
    added_at: dict[int, int] = {}
    committed_pages: list[np.ndarray] = []
    total = sum(len(b) for b in adds)

    for step in range(400):
        now = step * DT
        if step < len(adds):
            for rank in ranks:
                rank.queue.add(adds[step], now)
            for req in adds[step]:
                added_at[req.room] = step
        local = []
        for r, rank in enumerate(ranks):
            q = rank.queue
            for room in q.rooms.tolist():
                p = plan[(r, room)]
                if room not in rank.resolved and step >= added_at[room] + p.resolve_after:
                    rank.resolved.add(room)
                    q.initialised(room, required_completions=1)
                if room in rank.sent_at:
                    since = step - rank.sent_at[room]
                    if since >= p.complete_after:
                        q.completed(room, "prefill-0")
                        q.completed(room, "prefill-0")  # duplicates count once
                    if since == p.stamp_after:
                        rank.aux["room"][q.cols.slot[q.cols.index_of(room)]] = room
            transport = np.full(len(q), KVPoll.Transferring, dtype=np.uint8)
            failures = {}
            for i, room in enumerate(q.rooms.tolist()):
                if plan[(r, room)].error_at <= step:
                    transport[i] = KVPoll.Failed
                    failures[room] = f"transport error on rank {r}"
            local.append(q.local_statuses(transport, failures, now))
        if not len(local[0]):
            assert all(len(v) == 0 for v in local)
            if step >= len(adds):
                break
            continue
        reduced = fake_reduce(local)
        decisions = [rank.queue.apply(reduced.copy(), now) for rank in ranks]

        # Identical decisions and identical queues on every rank.
        first = decisions[0]
        for d in decisions[1:]:
            assert [(m.room, m.pages.tolist(), m.aux_slot) for m in d.send_metadata] == [
                (m.room, m.pages.tolist(), m.aux_slot) for m in first.send_metadata
            ]
            assert [c.room for c in d.step.committed] == [c.room for c in first.step.committed]
            assert [a.room for a in d.step.aborted] == [a.room for a in first.step.aborted]
        for rank in ranks[1:]:
            assert np.array_equal(rank.queue.rooms, ranks[0].queue.rooms)
        for rank, d in zip(ranks, decisions):
            for m in d.send_metadata:
                rank.sent_at[m.room] = step
            for c in d.step.committed:
                assert int(c.aux_row["room"]) == c.room
                assert rank.aux["room"][...].tolist().count(c.room) == 0, "stamp not zeroed"
                committed_pages.append(c.pages)
                rank.pages.free(c.pages)  # the engine finishes decoding
            for a in d.step.aborted:
                own = a.reason
                assert a.from_other_rank == (own == "failed on another rank")
        for c in first.step.committed:
            assert c.room not in ended
            ended[c.room] = ["commit", step]
        for a in first.step.aborted:
            assert a.room not in ended
            ended[a.room] = ["abort", step]
        # At least one rank names the root cause of each abort.
        for i in range(len(first.step.aborted)):
            assert any(not d.step.aborted[i].from_other_rank for d in decisions)

    assert len(ended) == total, f"{total - len(ended)} requests never ended"
    for rank in ranks:
        assert len(rank.queue) == 0
        rank.pages.check_no_leaks()
        rank.slots.check_no_leaks()
        assert not rank.aux["room"].any()
        assert not rank.queue.allocated and not rank.queue.reasons


def test_the_gate_holds_a_completed_room_until_its_stamp_lands() -> None:
    rank = make_rank()
    q = rank.queue
    q.add([DecodeRequest(room=7, num_pages=2)], 0.0)
    q.initialised(7, 1)
    v = q.local_statuses(np.array([KVPoll.WaitingForInput], dtype=np.uint8), {}, 0.0)
    (meta,) = q.apply(v, 0.0).send_metadata
    q.completed(7, "p")
    transferring = np.array([KVPoll.Transferring], dtype=np.uint8)
    assert q.local_statuses(transferring, {}, 0.1).tolist() == [KVPoll.Transferring]
    rank.aux["room"][meta.aux_slot] = 7
    v = q.local_statuses(transferring, {}, 0.2)
    assert v.tolist() == [KVPoll.Success]
    (done,) = q.apply(v, 0.2).step.committed
    assert done.room == 7 and done.pages.tolist() == meta.pages.tolist()


def test_a_wrong_room_stamp_is_a_local_failure_not_a_commit() -> None:
    rank = make_rank()
    q = rank.queue
    q.add([DecodeRequest(room=7, num_pages=1)], 0.0)
    q.initialised(7, 1)
    (meta,) = q.apply(np.array([KVPoll.WaitingForInput], dtype=np.uint8), 0.0).send_metadata
    q.completed(7, "p")
    rank.aux["room"][meta.aux_slot] = 99
    v = q.local_statuses(np.array([KVPoll.Transferring], dtype=np.uint8), {}, 0.1)
    assert v.tolist() == [KVPoll.Failed]
    (aborted,) = q.apply(v, 0.1).step.aborted
    assert "room stamp 99" in aborted.reason and not aborted.from_other_rank
    rank.pages.check_no_leaks()
    rank.slots.check_no_leaks()


def test_allocation_is_fifo_and_stops_at_the_first_request_that_does_not_fit() -> None:
    rank = make_rank()
    q = rank.queue
    reqs = [DecodeRequest(1, 10), DecodeRequest(2, 20), DecodeRequest(3, 1)]
    q.add(reqs, 0.0)
    for r in reqs:
        q.initialised(r.room, 1)
    ready = np.full(3, KVPoll.WaitingForInput, dtype=np.uint8)
    decisions = q.apply(ready, 0.0)
    assert [m.room for m in decisions.send_metadata] == [1]  # 2 does not fit; 3 must not pass it


def test_timeouts_name_what_was_missing() -> None:
    rank = make_rank()
    q = rank.queue
    q.add([DecodeRequest(1, 1), DecodeRequest(2, 1)], 0.0)
    q.initialised(2, 2)
    ready = np.array([KVPoll.Bootstrapping, KVPoll.WaitingForInput], dtype=np.uint8)
    q.apply(ready, 0.0)
    q.completed(2, "p0")
    transport = np.array([KVPoll.Bootstrapping, KVPoll.Transferring], dtype=np.uint8)
    v = q.local_statuses(transport, {}, 10.0)
    assert v.tolist() == [KVPoll.Failed, KVPoll.Failed]
    aborted = q.apply(v, 10.0).step.aborted
    assert "resolving or connecting" in aborted[0].reason
    assert "1 of 2 prefill ranks done" in aborted[1].reason


def test_reduced_vector_of_the_wrong_length_is_refused() -> None:
    rank = make_rank()
    rank.queue.add([DecodeRequest(1, 1)], 0.0)
    with pytest.raises(ValueError, match="2 entries for 1 rooms"):
        rank.queue.apply(np.zeros(2, dtype=np.uint8), 0.0)


def test_adding_a_queued_room_again_is_refused_and_changes_nothing() -> None:
    rank = make_rank()
    rank.queue.add([DecodeRequest(1, 1)], 0.0)
    with pytest.raises(ValueError, match="room 1 is already queued"):
        rank.queue.add([DecodeRequest(2, 1), DecodeRequest(1, 1)], 0.0)
    assert rank.queue.rooms.tolist() == [1]


def test_double_free_through_the_pool_is_still_caught() -> None:
    rank = make_rank()
    pages = rank.pages.alloc(2)
    rank.pages.free(pages)
    with pytest.raises(DoubleFreeError):
        rank.pages.free(pages)


def test_a_fenced_room_blocks_no_commit_and_a_dead_writer_frees_the_queue() -> None:
    """Pure reproduction of "after a prefill dies, decode stops serving everyone": room 1 is
    fenced on a dead one-sided writer, room 2 (same writer) waits for memory, room 3 (another
    prefill) must still be allocated and committed."""
    rank = make_rank()
    q = rank.queue
    q.one_sided_writes = True  # the dead writer's silence does not lift the fence
    q.add([DecodeRequest(1, 12), DecodeRequest(2, 20), DecodeRequest(3, 12)], 0.0)
    q.initialised(1, 1, ["dead"])
    q.initialised(2, 1, ["dead"])
    q.initialised(3, 1, ["alive"])
    none = np.full(3, KVPoll.WaitingForInput, dtype=np.uint8)
    sent = q.apply(q.local_statuses(none, {}, 0.1), 0.1).send_metadata
    assert [m.room for m in sent] == [1]  # room 2 does not fit; FIFO holds room 3 behind it
    assert q.writer_dead("dead", "lost connection to prefill dead") == [1]
    step = q.apply(q.local_statuses(np.full(3, 2, dtype=np.uint8), {}, 0.2), 0.2)
    assert sorted(a.room for a in step.step.aborted) == [1, 2]
    assert step.step.released == (2,)  # room 1 stays fenced: its writer may still write
    assert [m.room for m in step.send_metadata] == [3]
    slot = step.send_metadata[0].aux_slot
    rank.aux["room"][slot] = 3
    assert q.completed(3, "alive")
    polled = np.array([KVPoll.Transferring, KVPoll.Success], dtype=np.uint8)
    step = q.apply(q.local_statuses(polled, {}, 0.3), 0.3)
    assert [c.room for c in step.step.committed] == [3]
    assert list(q.rooms) == [1]


@pytest.mark.parametrize("moved_to", [0, 99])
def test_a_stamp_that_moves_between_the_gate_and_the_commit_on_one_rank_keeps_lock_step(
    moved_to: int,
) -> None:
    """The commit is decided on the reduced vector alone: a stamp that one rank sees change
    after its gate passed (a stray write past the fence, an API 1.0 transport) cannot make that
    rank abort while the others commit. The row it hands out is the one its gate checked."""
    ranks = [make_rank() for _ in range(3)]
    for rank in ranks:
        rank.queue.add([DecodeRequest(room=7, num_pages=2)], 0.0)
        rank.queue.initialised(7, 1)
    waiting = np.array([KVPoll.WaitingForInput], dtype=np.uint8)
    reduced = fake_reduce([r.queue.local_statuses(waiting, {}, 0.0) for r in ranks])
    for rank in ranks:
        (meta,) = rank.queue.apply(reduced.copy(), 0.0).send_metadata
        rank.aux["output_token_id"][meta.aux_slot] = 4242
        rank.aux["room"][meta.aux_slot] = 7
        rank.queue.completed(7, "p")
    transferring = np.array([KVPoll.Transferring], dtype=np.uint8)
    local = [r.queue.local_statuses(transferring, {}, 0.1) for r in ranks]
    assert all(v.tolist() == [KVPoll.Success] for v in local)  # every gate passed
    slot = int(ranks[1].queue.cols.slot[0])
    ranks[1].aux["room"][slot] = moved_to  # between this rank's gate and the commit
    ranks[1].aux["output_token_id"][slot] = 1
    reduced = fake_reduce(local)
    decisions = [r.queue.apply(reduced.copy(), 0.1) for r in ranks]
    for d in decisions:
        assert [c.room for c in d.step.committed] == [7]
        assert d.step.aborted == () and d.step.released == ()
    rows = [d.step.committed[0].aux_row for d in decisions]
    assert all(int(row["room"]) == 7 and int(row["output_token_id"]) == 4242 for row in rows)
    assert decisions[1].stamp_moved == (7,) and decisions[0].stamp_moved == ()
    for rank in ranks:
        assert not len(rank.queue) and not rank.queue.requests
