"""`kvbridge demo --metrics-port`: scrape /metrics over HTTP and compare with the demo's report."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _total(samples, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def test_demo_serves_metrics_that_match_its_report() -> None:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "kvbridge",
        "demo",
        "--requests",
        "16",
        "--max-prompt-tokens",
        "600",
        "--timeout",
        "200",
        "--metrics-port",
        str(port),
        "--metrics-linger",
        "120",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    mid_run = None
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "metrics on http" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)
        else:
            pytest.fail(f"demo ended without serving metrics:\n{''.join(lines)}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
            samples = _samples(r.read().decode())
        mid_run = proc.poll()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert mid_run is None  # scraped while the demo was still up
    report = "".join(lines)
    committed = int(re.search(r"requests committed\s+(\d+) / 16", report).group(1))
    moved = int(re.search(r"bytes moved\s+[\d.]+ MB \((\d+) bytes\)", report).group(1))
    assert committed == 16, report
    decode_tp = 2  # the demo's default layout: prefill TP2 -> decode TP2
    assert _total(samples, "kvbridge_requests_total", role="decode", outcome="success") == (
        committed * decode_tp
    )
    assert _total(samples, "kvbridge_requests_total", role="decode", outcome="failed") == 0
    assert _total(samples, "kvbridge_transfer_bytes_sum", role="decode") == moved
    assert _total(samples, "kvbridge_transfer_bytes_count", role="decode") == committed * decode_tp
    assert _total(samples, "kvbridge_transfer_seconds_count", role="decode") == (
        committed * decode_tp
    )
    # Prefill wrote every KV byte decode received (the aux row is counted on both sides too).
    assert _total(samples, "kvbridge_transfer_bytes_sum", role="prefill") == moved
    assert _total(samples, "kvbridge_resolve_seconds_count", role="decode") == committed * decode_tp
    assert _total(samples, "kvbridge_queue_depth", role="decode") == 0
    assert _total(samples, "kvbridge_steps_total", role="decode") > 0
    assert _total(samples, "kvbridge_control_frames_dropped_total") == 0
