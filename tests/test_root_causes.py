"""A rank's own root cause survives a follower's notice that reached it first (rule 7).

A follow ("this peer only failed because another rank did") fails the room without a reason;
a real cause seen on the same rank before the abort is decided must still be the reason it
reports, and a real cause is never replaced by a later one.
"""

from __future__ import annotations

import numpy as np

from kvbridge import AuxLayout, AuxSlotPool, PagePool
from kvbridge.protocol.decode import FROM_OTHER_RANK, DecodeQueue, DecodeRequest
from kvbridge.protocol.prefill import PrefillQueue, PrefillRequest
from kvbridge.status import KVPoll


def _decode_queue() -> DecodeQueue:
    aux = AuxLayout().allocate(4)
    return DecodeQueue(
        PagePool(8), AuxSlotPool(aux["room"]), aux, bootstrap_timeout=5.0, waiting_timeout=5.0
    )


def _decode_abort(q: DecodeQueue) -> tuple[str, bool]:
    transport = np.full(len(q), KVPoll.Transferring, dtype=np.uint8)
    (aborted,) = q.apply(q.local_statuses(transport, {}, 0.2), 0.2).step.aborted
    return aborted.reason, aborted.from_other_rank


def _decode_room_in_transfer(q: DecodeQueue) -> None:
    q.add([DecodeRequest(1, 2)], 0.0)
    q.initialised(1, 2, ["p0", "p1"])
    waiting = np.array([KVPoll.WaitingForInput], dtype=np.uint8)
    assert q.apply(q.local_statuses(waiting, {}, 0.1), 0.1).send_metadata


def test_decode_a_writers_root_cause_after_another_writers_follow_is_the_reason() -> None:
    q = _decode_queue()
    _decode_room_in_transfer(q)
    assert q.peer_failed(1, "p0", None)  # p0 only followed p1's failure; its notice came first
    assert q.peer_failed(1, "p1", "prefill p1: out of memory")
    assert _decode_abort(q) == ("prefill p1: out of memory", False)


def test_decode_a_local_failure_after_a_follow_is_the_reason() -> None:
    q = _decode_queue()
    _decode_room_in_transfer(q)
    q.peer_failed(1, "p0", None)
    transport = np.array([KVPoll.Failed], dtype=np.uint8)
    v = q.local_statuses(transport, {1: "transport: connection reset"}, 0.2)
    (aborted,) = q.apply(v, 0.2).step.aborted
    assert (aborted.reason, aborted.from_other_rank) == ("transport: connection reset", False)


def test_decode_a_follow_alone_says_failed_on_another_rank() -> None:
    q = _decode_queue()
    _decode_room_in_transfer(q)
    q.peer_failed(1, "p0", None)
    q.peer_failed(1, "p1", None)
    assert _decode_abort(q) == (FROM_OTHER_RANK, True)


def test_decode_a_root_cause_is_never_replaced() -> None:
    q = _decode_queue()
    _decode_room_in_transfer(q)
    q.fail(1, "first cause")
    q.peer_failed(1, "p0", None)
    q.peer_failed(1, "p1", "second cause")
    assert _decode_abort(q) == ("first cause", False)


def _prefill_abort(q: PrefillQueue) -> tuple[str, bool]:
    transport = np.full(len(q), KVPoll.WaitingForInput, dtype=np.uint8)
    (aborted,) = q.apply(q.local_statuses(transport, {}, 0.1)).aborted
    return aborted.reason, aborted.from_other_rank


def _prefill_queue() -> PrefillQueue:
    q = PrefillQueue(authoritative=True, bootstrap_timeout=5.0, waiting_timeout=5.0)
    q.add([PrefillRequest(1)], 0.0)
    return q


def test_prefill_a_root_cause_after_a_follow_is_the_reason() -> None:
    q = _prefill_queue()
    q.follow(1)  # a decode rank that only followed another decode rank's failure
    q.fail(1, "decode aborted: client disconnected")
    assert _prefill_abort(q) == ("decode aborted: client disconnected", False)


def test_prefill_a_transport_failure_after_a_follow_is_the_reason() -> None:
    q = _prefill_queue()
    q.follow(1)
    transport = np.array([KVPoll.Failed], dtype=np.uint8)
    (aborted,) = q.apply(q.local_statuses(transport, {1: "send failed"}, 0.1)).aborted
    assert (aborted.reason, aborted.from_other_rank) == ("send failed", False)


def test_prefill_a_root_cause_is_never_replaced_and_a_follow_alone_is_a_follow() -> None:
    q = _prefill_queue()
    q.fail(1, "first cause")
    q.follow(1)
    q.fail(1, "second cause")
    assert _prefill_abort(q) == ("first cause", False)
    q = _prefill_queue()
    q.follow(1)
    assert _prefill_abort(q) == (FROM_OTHER_RANK, True)
