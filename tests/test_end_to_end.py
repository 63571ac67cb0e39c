"""Whole prefill -> decode sessions: real processes, gloo, bootstrap, control channel, Fake.

Every byte of every committed request is verified by the decode ranks (see kvbridge.demo).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kvbridge.demo import DemoPlan, run_demo

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize(
    ("prefill_tp", "prefill_cp", "decode_tp"),
    [(1, 1, 1), (2, 1, 2), (2, 1, 1), (1, 1, 2), (1, 2, 2)],
    ids=["tp1-to-tp1", "tp2-to-tp2", "tp2-to-tp1", "tp1-to-tp2", "cp2-to-tp2"],
)
def test_every_byte_arrives(prefill_tp: int, prefill_cp: int, decode_tp: int) -> None:
    plan = DemoPlan(
        prefill_tp=prefill_tp,
        prefill_cp=prefill_cp,
        decode_tp=decode_tp,
        requests=12,
        max_prompt_tokens=600,
        timeout=240,
    )
    report = run_demo(plan)
    assert report.verify_errors == ()
    assert report.committed == 12 and report.failed == 0
    assert report.pools_full
    assert report.bytes_moved > 0


def test_two_prefill_dp_replicas_resolved_through_bootstrap() -> None:
    report = run_demo(
        DemoPlan(
            prefill_tp=1, prefill_dp=2, decode_tp=1, requests=12, max_prompt_tokens=300, timeout=240
        )
    )
    assert report.ok, (report.verify_errors, report.failures)


def test_killed_prefill_fails_unfinished_requests_and_frees_everything() -> None:
    # Chunks land 0.2 s late, so the kill certainly comes while most requests are in flight.
    plan = DemoPlan(
        requests=48,
        arrivals_per_step=1,
        max_prompt_tokens=600,
        transport_options={"faults": {"delay": {"send": 0.2}}},
        kill_prefill_after=3,
        heartbeat_interval=0.3,
        heartbeat_max_misses=2,
        waiting_timeout=60,
        timeout=240,
    )
    report = run_demo(plan)
    assert report.failed > 0, "the prefill was killed after everything finished"
    assert report.committed + report.failed == plan.requests
    lost = {r for r in report.reasons if r.startswith("lost connection to prefill 127.0.0.1:")}
    assert lost, report.reasons
    assert report.reasons <= lost | {"failed on another rank"}, report.reasons
    assert report.pools_full, "pages or aux slots leaked"
    assert report.verify_errors == ()


def test_demo_command_exits_zero_and_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvbridge", "demo", "--requests", "8", "--max-prompt-tokens", "300"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"requests committed\s+8 / 8", result.stdout), result.stdout
    assert re.search(r"bytes verified\s+all", result.stdout), result.stdout
    assert "handoff latency p99" in result.stdout


def test_demo_refuses_bad_flags_with_a_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvbridge", "demo", "--prefill-tp", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "cannot be split over TP 3" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "kvbridge", "demo", "--transport", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "no transport named 'nope'" in result.stderr
