"""The queues' one-look-up fast path decides exactly what the full ``apply`` decides.

Each queue's ``apply`` first looks the step's keys up in a table and returns at once when no
room needs a decision. Two queues fed the same random operations, one with the real table and
one whose table sends every step down the full path, must give the same decisions and end in
the same state, step after step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvbridge import AuxLayout, PagePool
from kvbridge.memory import AuxSlotPool
from kvbridge.protocol import decode as decode_module
from kvbridge.protocol import prefill as prefill_module
from kvbridge.protocol.columns import FAILED, SUCCESS, TRANSFERRING, WAITING
from kvbridge.protocol.decode import DecodeQueue, DecodeRequest
from kvbridge.protocol.prefill import PrefillQueue, PrefillRequest

ROOMS = 3
decode_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "init", "done", "stamp", "fail", "ack", "step", "step"]),
        st.integers(1, ROOMS),
        st.sampled_from([int(TRANSFERRING), int(SUCCESS), int(FAILED)]),
    ),
    max_size=60,
)


class _AllDecisions:
    """Run ``fn`` with the module's fast-path table set to "every key needs a decision"."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, fn: Any, *args: Any) -> Any:
        real = self.module._ACTS
        self.module._ACTS = np.ones_like(real)
        try:
            return fn(*args)
        finally:
            self.module._ACTS = real


def _decode_queue() -> DecodeQueue:
    aux = AuxLayout().allocate(4)
    return DecodeQueue(
        PagePool(8), AuxSlotPool(aux["room"]), aux, bootstrap_timeout=50.0, waiting_timeout=50.0
    )


def _decode_view(d: Any) -> tuple[Any, ...]:
    step = d.step
    return (
        [(m.room, m.pages.tolist(), m.aux_slot) for m in d.send_metadata],
        [(c.room, c.pages.tolist(), c.aux_row.tolist()) for c in step.committed],
        step.aborted,
        step.released,
        d.stamp_moved,
    )


def _cols(q: Any) -> tuple[Any, ...]:
    c = q.cols
    return tuple(a.tolist() for a in (c.rooms, c.stage, c.local, c.slot, c.floor, c.deadline))


T, S = int(TRANSFERRING), int(SUCCESS)
FENCE_THEN_RELEASE = [("add", 1, T), ("init", 1, T), ("step", 1, T), ("fail", 1, T)]
FENCE_THEN_RELEASE += [("step", 1, T), ("ack", 1, T), ("step", 1, T)]


@settings(max_examples=300, deadline=None)
@given(decode_ops)
# each decision alone: allocate, then commit by stamp; abort into the fence, then release
@example([("add", 1, T), ("init", 1, T), ("step", 1, T), ("stamp", 1, T), ("step", 1, S)])
@example(FENCE_THEN_RELEASE)
@example([("add", 1, T), ("fail", 1, T), ("step", 1, T)])
def test_decode_fast_path_decides_as_the_full_apply(ops: list[tuple[str, int, int]]) -> None:
    full, fast = _decode_queue(), _decode_queue()
    slow = _AllDecisions(decode_module)
    now = 0.0
    for op, room, transport in ops:
        now += 1.0
        for q in (full, fast):
            i = q.cols.index_of(room)
            if op == "add" and i is None and room not in q.fenced:
                q.add([DecodeRequest(room, 2)], now)
            elif op == "init" and i is not None:
                q.initialised(room, 1, ["w"])
            elif op == "done" and i is not None:
                q.completed(room, "w")
            elif op == "ack" and i is not None:
                q.acknowledged(room, "w")
            elif op == "fail" and i is not None:
                q.fail(room, "boom")
            elif op == "stamp" and i is not None and q.cols.slot[i] >= 0:
                q.stamps[q.cols.slot[i]] = room
        if op != "step" or not len(full):
            continue
        statuses = np.full(len(full), transport, dtype=np.uint8)
        got = []
        for q, run in ((full, slow), (fast, lambda fn, *a: fn(*a))):
            local = run(q.local_statuses, statuses, {}, now)
            got.append((local.tolist(), _decode_view(run(q.apply, local, now))))
        assert got[0] == got[1]
        assert _cols(full) == _cols(fast)
        assert full.fenced.keys() == fast.fenced.keys()


prefill_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "meta", "sent", "fail", "step", "step"]),
        st.integers(1, ROOMS),
        st.sampled_from([int(WAITING), int(TRANSFERRING), int(SUCCESS), int(FAILED)]),
    ),
    max_size=60,
)


@pytest.mark.parametrize("authoritative", [True, False])
@settings(max_examples=300, deadline=None)
@given(ops=prefill_ops)
# ready, then finished; and a failure
@example(ops=[("add", 1, 2), ("meta", 1, 2), ("step", 1, 2), ("sent", 1, 2), ("step", 1, 4)])
@example(ops=[("add", 1, 2), ("fail", 1, 2), ("step", 1, 2)])
def test_prefill_fast_path_decides_as_the_full_apply(
    authoritative: bool, ops: list[tuple[str, int, int]]
) -> None:
    def queue() -> PrefillQueue:
        return PrefillQueue(
            authoritative=authoritative, bootstrap_timeout=50.0, waiting_timeout=50.0
        )

    full, fast = queue(), queue()
    slow = _AllDecisions(prefill_module)
    now = 0.0
    for op, room, transport in ops:
        now += 1.0
        for q in (full, fast):
            i = q.cols.index_of(room)
            if op == "add" and i is None:
                q.add([PrefillRequest(room)], now)
            elif op == "meta" and i is not None:
                q.metadata_complete(room)
            elif op == "sent" and i is not None and q.cols.stage[i] == prefill_module.INFLIGHT:
                q.sent(room, True, now)
            elif op == "fail" and i is not None:
                q.fail(room, "boom")
        if op != "step" or not len(full):
            continue
        statuses = np.full(len(full), transport, dtype=np.uint8)
        got = []
        for q, run in ((full, slow), (fast, lambda fn, *a: fn(*a))):
            local = run(q.local_statuses, statuses, {}, now)
            got.append((local.tolist(), run(q.apply, local)))
        assert got[0] == got[1]
        assert _cols(full) == _cols(fast)
