"""Real processes, real gloo, the Fake transport: one test per bug the queues must prevent.

(1) ranks resolve the prefill DP rank at different steps (SGLang #21680);
(2) completion arrives everywhere but the aux row lands late on one rank (SGLang #26394);
(3) the room stamp never lands on one rank, so every rank aborts it in the same step;
(4) a CP=2 x TP=2 prefill with no-op CP ranks and zero-page last chunks (SGLang #19119/#19504);
plus the debug mode that names the first differing room instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
from typing import Any

import pytest

from kvbridge.protocol.outcomes import FROM_OTHER_RANK
from lockstep_workers import cp_prefill_worker, decode_worker

pytestmark = pytest.mark.multiprocess
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(target: Any, world: int, scenario: dict) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=target, args=(r, world, port, scenario, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    outs = []
    try:
        for _ in range(world):
            outs.append(results.get(timeout=TIMEOUT))
    except queue.Empty:
        pytest.fail(f"only {len(outs)} of {world} ranks reported within {TIMEOUT}s (hang?)")
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    outs.sort(key=lambda o: o["rank"])
    for o in outs:
        assert not o["errors"], f"rank {o['rank']}: {o['errors']}"
    return outs


def requests(count: int, first: int = 1, pages: int = 3) -> list[list[tuple[int, int]]]:
    """One batch per step: ``count`` rooms with 1..pages pages."""
    return [[(first + i, 1 + i % pages)] for i in range(count)]


def assert_identical(outs: list[dict]) -> None:
    base = [e[:3] for e in outs[0]["events"]]
    for o in outs[1:]:
        assert [e[:3] for e in o["events"]] == base, f"rank {o['rank']} diverged"
    for o in outs:
        assert o["leftover"] == 0
        assert o["pages_free"] == 64 and o["slots_free"] == 8 and o["stamps_zero"]


@pytest.mark.parametrize("world", [2, 4])
def test_dp_rank_resolved_at_different_steps(world: int) -> None:
    delays = [0] + [8 * r for r in range(1, world)]
    outs = run_world(decode_worker, world, {"dp_delay": delays, "adds": requests(6)})
    assert_identical(outs)
    assert sorted(e[2] for e in outs[0]["events"] if e[0] == "commit") == list(range(1, 7))


@pytest.mark.parametrize("world", [2, 4])
def test_aux_row_lands_late_on_one_rank(world: int) -> None:
    scenario = {
        "dp_delay": [0] * world,
        "adds": requests(5),
        "faults": {"aux_delay": 0.3, "aux_delay_ranks": [1], "ack_before_aux": True},
    }
    outs = run_world(decode_worker, world, scenario)
    assert_identical(outs)
    assert all(e[0] == "commit" for e in outs[0]["events"])
    assert outs[1]["gate_held"] > 0, "the late aux row never raced the completion"
    assert outs[0]["gate_held"] == 0


def test_room_stamp_never_lands_so_every_rank_aborts_together() -> None:
    scenario = {
        "dp_delay": [0, 0],
        "adds": [[(1, 2)], [(2, 1)]],
        "faults": {"aux_delay": 3600, "aux_delay_ranks": [1], "ack_before_aux": True},
        "waiting_timeout": 2.0,
    }
    outs = run_world(decode_worker, 2, scenario)
    assert_identical(outs)
    aborts = [[e for e in o["events"] if e[0] == "abort"] for o in outs]
    assert [e[2] for e in aborts[0]] == [1, 2]
    for e in aborts[1]:
        assert "room stamp still 0" in e[3] and e[4] is False
    for e in aborts[0]:
        assert e[3] == "failed on another rank" and e[4] is True


def test_cp2_tp2_prefill_with_noop_ranks_and_zero_page_chunks() -> None:
    adds = [[(1, 2)], [(2, 0)], [(3, 4)], [(4, 0)]]
    outs = run_world(cp_prefill_worker, 4, {"adds": adds})
    base = outs[0]["events"]
    assert sorted(e[2] for e in base if e[0] == "finished") == [1, 2, 3, 4]
    for o in outs[1:]:
        assert o["events"] == base, f"prefill rank {o['rank']} diverged"
    for o in outs[:2]:  # the authoritative ranks host the decode TP group
        assert sorted(o["committed"]) == [1, 2, 3, 4]
        assert o["pages_free"] == 64


def test_a_root_cause_seen_only_on_a_noop_cp_rank_reaches_decode() -> None:
    """Issue 22, defect 1 way (c): the engine of prefill rank 3 (cp 1, tp 1: it tells decode
    nothing) gives up on room 3. Every prefill rank aborts it in the same step, and decode is
    told the root cause and where it was seen, not only "failed on another rank"."""
    cause = "engine: out of memory on this rank"
    adds = [[(1, 2)], [(2, 1)], [(3, 4)], [(4, 1)]]
    outs = run_world(cp_prefill_worker, 4, {"adds": adds, "engine_aborts": {"3": [(2, 3, cause)]}})
    base = [e[:3] for e in outs[0]["events"]]  # the same decisions; reasons differ by rank
    for o in outs[1:]:
        assert [e[:3] for e in o["events"]] == base, f"prefill rank {o['rank']} diverged"
    for o in outs:
        (abort,) = [e for e in o["events"] if e[0] == "abort"]
        assert abort[2] == 3 and abort[3] == (cause if o["rank"] == 3 else FROM_OTHER_RANK)
    aborted = [e for o in outs[:2] for e in o["decode_aborted"]]
    assert len(aborted) == 2 and {room for room, _, _ in aborted} == {3}
    for _, reason, _ in aborted:
        assert cause in reason and "cp1" in reason, reason
    for o in outs[:2]:
        assert sorted(o["committed"]) == [1, 2, 4]


def test_debug_mode_names_the_first_differing_room() -> None:
    scenario = {
        "dp_delay": [0, 0],
        "adds": requests(3),
        "extra_add": {"1": [1, [99, 1]]},  # rank 1 alone adds room 99 at step 1
        "debug_lockstep": True,
        "max_steps": 50,
    }
    outs = run_world(decode_worker, 2, scenario)
    for o in outs:
        assert "room" in o.get("lockstep_error", ""), o
        assert "99" in o["lockstep_error"]
