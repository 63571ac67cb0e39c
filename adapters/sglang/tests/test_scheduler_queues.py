"""SGLang issue #21680's scenario with SGLang's real decode scheduler queues and kvbridge.

Two decode TP ranks (separate processes, SGLang's own parallel runtime over gloo) each build
SGLang 0.5.23's real ``DecodePreallocQueue`` and ``DecodeTransferQueue`` around SGLang's real
``DecodeReqToTokenPool``, ``MHATokenToKVPool``, ``TokenToKVPoolAllocator``, tree cache and
``MetadataBuffers`` on CPU, with kvbridge-sglang's manager and receivers (through the plugin's
``get_kv_class``), fed by a third process: kvbridge's bootstrap server and a kvbridge-sglang
prefill rank (the adapter's manager and senders over SGLang's KV pool and metadata buffers), on
the Fake transport (loopback TCP between the processes). Each step is one pass of SGLang's own
``process_decode_queue`` on both ranks.

#21680 (and #21297): when each decode TP rank resolved a request's prefill DP rank on its own,
ranks moved requests between queues at different steps, and SGLang's collectives, sized by the
queues, desynchronised or hung. Here rank 1's bootstrap answers are held back, so the prefill's
parallel info (hence every request's prefill DP rank, and ``init(prefill_dp_rank)``) resolves
steps later on rank 1 than on rank 0, while requests keep arriving.

The scheduler itself is a stand-in only for what needs a model: ``tp_worker`` (no SWA, the KV
dtype string), ``running_batch`` (empty: nothing decodes here), the output streamer (records
what would go to clients), metrics (off) and the reasoning-token counter; everything else the
queues read is SGLang's (server args, model config from a ``config.json``, speculative
algorithm, the queues). See ``scheduler_ranks.py`` for the processes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import scheduler_ranks as sr
from conftest import require_sglang

from kvbridge.testing import processes

SCRIPT = Path(__file__).with_name("scheduler_ranks.py")
#: The tiny Llama of kvbridge.testing.tiny_model; the queues need only its config.
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": sr.LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": sr.KV_HEADS,
    "head_dim": sr.HEAD_DIM,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
#: kvbridge's own timeouts far beyond a phase's deadline: a room must end because the
#: queues, the receivers and the fence did their job, never because a timeout fired.
TIMEOUTS = {
    "KVBRIDGE_BOOTSTRAP_TIMEOUT": "600",
    "KVBRIDGE_WAITING_TIMEOUT": "600",
    "KVBRIDGE_HEARTBEAT_INTERVAL": "1",
    "KVBRIDGE_HEARTBEAT_MAX_MISSES": "30",
}
#: Compared between the ranks after every step: the pre-allocation queue, the transfer queue,
#: the held (deferred) releases. ``pending_reqs`` (index 4) is rank-local by design.
QUEUES = slice(1, 4)


class Run:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.decode = [json.loads((work / f"decode{r}.json").read_text()) for r in (0, 1)]
        self.prefill = json.loads((work / "prefill.json").read_text())

    def prefill_outcome(self, room: int) -> str:
        """The prefill sender's end for ``room``; a room it never saw end fails the test with
        its last status and every process's log lines that name the room."""
        got = self.prefill["outcome"].get(str(room))
        if got is None:
            lines = [
                f"{log.name}: {line}"
                for log in sorted(self.work.glob("*.log"))
                for line in log.read_text(errors="replace").splitlines()
                if str(room) in line
            ]
            pytest.fail(
                f"room {room} never ended on the prefill (its last poll() said KVPoll "
                f"{self.prefill['unended'].get(str(room))}):\n" + "\n".join(lines[-40:])
            )
        return got

    def events(self, phase: str, room: int) -> tuple[dict[str, Any], dict[str, Any]]:
        e0, e1 = (d[phase]["events"][str(room)] for d in self.decode)
        return e0, e1


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    require_sglang()
    work = tmp_path_factory.mktemp("scheduler-queues")
    (work / "model").mkdir()
    (work / "model" / "config.json").write_text(json.dumps(MODEL_CONFIG))
    env = processes.engine_env(
        SGLANG_CPU_OMP_THREADS_BIND="0|1",
        KVBRIDGE_TRANSPORT="fake",
        KVBRIDGE_FAKE_FAULTS=sr.fake_faults(),
        **TIMEOUTS,
    )
    bootstrap, dist = processes.free_port(), processes.free_port()
    common = [sys.executable, str(SCRIPT)]
    procs = [
        processes.start(
            "prefill", [*common, "prefill", str(work), str(bootstrap)], 0, work, env, SCRIPT.parent
        ),
        *(
            processes.start(
                f"decode{r}",
                [*common, "decode", str(work), str(bootstrap), str(dist), str(r)],
                0,
                work,
                env,
                SCRIPT.parent,
            )
            for r in (0, 1)
        ),
    ]
    # Each process ends on its own (deadlines per phase); this is the backstop. One that
    # failed ends the run: the others would only wait out their deadlines.
    deadline = time.monotonic() + 120 + sr.PHASE_DEADLINE * (len(sr.PHASES) + 1)
    try:
        while any(p.alive() for p in procs) and time.monotonic() < deadline:
            if any(not p.alive() and p.proc.returncode != 0 for p in procs):
                break
            time.sleep(0.5)
    finally:
        hung = [p.name for p in procs if p.alive() and time.monotonic() >= deadline]
        for p in procs:
            processes.stop(p)
    failed = [p for p in procs if p.proc.returncode != 0 or (work / f"{p.name}.error").exists()]
    if hung or failed:
        pytest.fail(
            f"processes hung: {hung}, failed: {[p.name for p in failed]}\n"
            + "\n".join(f"--- {p.name}\n{p.tail(30)}" for p in procs)
        )
    return Run(work)


def _rooms(phase: str, *, failing: bool | None = None, waves: tuple[str, ...] = ()) -> list[int]:
    return [
        r.room
        for r in sr.PHASES[phase]
        if (failing is None or r.fails_on_rank1 == failing) and (not waves or r.wave in waves)
    ]


def test_the_prefill_dp_rank_resolves_later_on_rank_1(run: Run) -> None:
    """The scenario happens: rank 1 calls ``init(prefill_dp_rank)`` steps after rank 0 for
    every request that arrived before its bootstrap answer, and neither rank sends a request's
    metadata before its own ``init``."""
    later = []
    for room in _rooms("lockstep", waves=("early", "skewed")):
        e0, e1 = run.events("lockstep", room)
        assert e0["init"] is not None and e1["init"] is not None, room
        later.append(e1["init"] > e0["init"])
    assert all(later), later
    for room in _rooms("lockstep", waves=("late",)):
        e0, e1 = run.events("lockstep", room)
        assert e0["init"] == e1["init"] == e0["added"], (room, e0, e1)
    for d in run.decode:
        assert d["lockstep"]["metadata_before_init"] == []


def test_the_queues_keep_identical_lengths_after_every_step(run: Run) -> None:
    records = run.decode[0]["lockstep"]["records"]
    assert records == run.decode[1]["lockstep"]["records"]  # both saw the same exchange
    differ = [(r0[0], r0[QUEUES], r1[QUEUES]) for r0, r1 in records if r0[QUEUES] != r1[QUEUES]]
    assert differ == []
    assert any(r0[4] != r1[4] for r0, r1 in records), "pending_reqs never differed: no skew"


def test_every_request_leaves_each_queue_once_on_both_ranks_in_the_same_step(run: Run) -> None:
    """A failing room may fail while it waits for pre-allocation (its receiver's poll steps
    the node, so the transport's failure can surface there) or once in transfer: which one
    depends on timing, but both ranks see it in the same step, in the same queue."""
    last = run.decode[0]["lockstep"]["records"][-1]
    assert not last[0][-1] and not last[1][-1], "a rank's deadline passed: not every room ended"
    for room in _rooms("lockstep"):
        e0, e1 = run.events("lockstep", room)
        for key in ("added", "left_prealloc", "entered_transfer", "left_transfer"):
            assert e0.get(key) == e1.get(key), (room, key, e0, e1)
        assert "added" in e0 and "left_prealloc" in e0, (room, e0)
        failing = room in sr.FAILING_ROOMS
        if not failing:
            assert "entered_transfer" in e0 and "left_transfer" in e0, (room, e0)
        assert ("entered_transfer" in e0) == ("left_transfer" in e0), (room, e0)
        ended = e0.get("left_transfer", e0["left_prealloc"])
        outcome, other = ("failed", "transferred") if failing else ("transferred", "failed")
        assert e0.get(outcome) == e1.get(outcome) == [ended], (room, e0, e1)
        assert other not in e0 and other not in e1, (room, e0, e1)


def test_the_pages_and_metadata_rows_hold_what_prefill_wrote(run: Run) -> None:
    for rank, d in enumerate(run.decode):
        assert d["lockstep"]["kv_errors"] == [], rank
        for room in _rooms("lockstep", failing=False):
            ev = d["lockstep"]["events"][str(room)]
            assert ev["output_ids"] == [sr.first_token(room)], (rank, room)
            assert ev["cached_tokens"] == sr.cached_tokens(room), (rank, room)
            assert ev["init_dp_rank"] == 0
    for room in _rooms("lockstep", failing=False):
        assert run.prefill_outcome(room) == "Success", room


def test_a_failure_on_one_rank_fails_the_request_on_both_in_the_same_step(run: Run) -> None:
    for room in _rooms("lockstep", failing=True):
        e0, e1 = run.events("lockstep", room)
        assert e0["failed"] == e1["failed"], (room, e0, e1)
        # The pages are held until kvbridge's fence lifts, then given back on both at once.
        assert e0.get("released") is not None and e0["released"] == e1.get("released")
        assert "injected failure" in e1["reason"], e1["reason"]
        # Rank 0 names the root cause (relayed by the prefill) or says another rank failed;
        # never its own state of the moment ("transfer not failed (status Transferring)").
        reason = e0["reason"]
        assert "not failed" not in reason, reason
        assert "injected failure" in reason or "another decode TP rank" in reason, reason
        assert run.prefill_outcome(room).startswith("Failed"), room


def test_nothing_leaked(run: Run) -> None:
    for phase in sr.PHASES:
        for rank, d in enumerate(run.decode):
            got = d[phase]
            assert got["free_at_end"] == got["free_at_start"], (phase, rank)
            assert got["live_in_kvbridge"] == [], (phase, rank)
    assert run.prefill["free_tokens"] == run.prefill["pool_tokens"]
    assert run.prefill["free_slots"] == run.prefill["slots"]


def test_control_rank_local_poll_answers_make_the_queues_diverge(run: Run) -> None:
    """With SGLang's MIN over the TP ranks replaced by each rank's own ``poll()`` answer, the
    same skew moves requests between the queues at different steps on the two ranks: the
    lock-step seen above is SGLang's consensus over kvbridge's per-rank answers."""
    records = run.decode[0]["rank_local"]["records"]
    assert any(r0[QUEUES] != r1[QUEUES] for r0, r1 in records)
    moved = [run.events("rank_local", room) for room in _rooms("rank_local")]
    assert any(e0.get("left_prealloc") != e1.get("left_prealloc") for e0, e1 in moved)
