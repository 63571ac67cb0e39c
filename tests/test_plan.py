"""The write plan and prefill keys as values (kvbridge.protocol.plan), from a bootstrap answer."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.protocol.plan import (
    PrefillKey,
    PrefillTarget,
    by_control,
    pages_decode_needs,
    plan_for,
)


def info(tp: int, dp: int = 1, page_bytes: int = 4096, missing: tuple[int, ...] = ()) -> Any:
    ranks = [
        {
            "dp_rank": d,
            "tp_rank": t,
            "cp_rank": 0,
            "pp_rank": 0,
            "control": f"tcp://127.0.0.1:{7000 + 10 * d + t}",
            "endpoint": {"rank": t},
        }
        for d in range(dp)
        for t in range(tp)
        if t not in missing
    ]
    sizes = {"dp_size": dp, "tp_size": tp, "pp_size": 1}
    return {"ranks": ranks, "sizes": sizes, "page_bytes": page_bytes, "kv_layout": "head_sharded"}


def test_a_prefill_key_round_trips_through_its_wire_form() -> None:
    key = PrefillKey("[::1]:8998", 3, 1)
    assert str(key) == "[::1]:8998/dp3/tp1"
    assert PrefillKey.parse(str(key)) == key
    for bad in ("host:1", "host:1/dp/tp0", "host:1/dp0/tp1/x", ""):
        with pytest.raises(ValueError):
            PrefillKey.parse(bad)


def test_two_prefill_ranks_fill_halves_of_one_decode_page() -> None:
    target = plan_for("p:1", info(tp=2), 0, decode_rank=0, decode_tp=1, decode_page_bytes=8192)
    assert isinstance(target, PrefillTarget)
    assert target.controls == ("p:1/dp0/tp0", "p:1/dp0/tp1")
    assert [(c.prefill_key, c.expected) for c in target.plan] == [
        ("p:1/dp0/tp0", 1),
        ("p:1/dp0/tp1", 1),
    ]
    assert [c.route.dst_offset for c in target.plan] == [0, 4096]
    assert by_control([(5, target), (6, target)]) == {
        "tcp://127.0.0.1:7000": [5, 6],
        "tcp://127.0.0.1:7001": [5, 6],
    }


def test_an_answer_missing_a_rank_is_a_reason_not_an_exception() -> None:
    """Every byte from the network is untrusted: a bootstrap answer that lists TP rank 0 of 2
    only fails the rooms that need it (it raised KeyError in the scheduler thread before)."""
    reason = plan_for(
        "p:1", info(tp=2, missing=(1,)), 0, decode_rank=0, decode_tp=1, decode_page_bytes=8192
    )
    assert isinstance(reason, str) and "lists TP ranks [0] of DP rank 0" in reason


def test_a_dp_rank_out_of_range_and_unmatched_pages_are_reasons() -> None:
    out = plan_for("p:1", info(tp=1), 2, decode_rank=0, decode_tp=1, decode_page_bytes=4096)
    assert out == "prefill DP rank 2 out of range for p:1 (dp_size 1)"
    out = plan_for("p:1", info(tp=1), 0, decode_rank=0, decode_tp=1, decode_page_bytes=2048)
    assert isinstance(out, str) and "cannot feed this decode" in out


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 40),
    data=st.data(),
)
def test_pages_decode_needs_sends_exactly_the_last_requested_pages_over_any_chunking(
    total: int, data
) -> None:
    """Chunked prefill sends the prompt in chunks; decode may hold a prefix of its own."""
    requested = data.draw(st.one_of(st.none(), st.integers(0, total)))
    prompt = np.arange(100, 100 + total)
    cuts = sorted(data.draw(st.lists(st.integers(0, total), max_size=5)))
    bounds = [0, *cuts, total]
    sent = []
    for start, end in itertools.pairwise(bounds):
        keep = pages_decode_needs(prompt[start:end], start, total, requested)
        assert not isinstance(keep, str)
        sent += keep.tolist()
    want = prompt if requested is None else prompt[total - requested :]
    assert sent == want.tolist()


def test_pages_decode_needs_refuses_more_pages_than_the_prompt_has() -> None:
    why = pages_decode_needs(np.arange(4), 0, 4, 5)
    assert why == "decode allocated 5 pages, this prefill holds 4 for the prompt"
