"""The Prometheus exporter (kvbridge.metrics) as an observer: values, causes, optional import."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import numpy as np
import pytest

prom = pytest.importorskip("prometheus_client")

from kvbridge import RankIdentity, Role  # noqa: E402
from kvbridge.metrics import PrometheusObserver, failure_cause, serve  # noqa: E402
from kvbridge.observe import ObserverRelay  # noqa: E402
from kvbridge.status import KVPoll  # noqa: E402

DECODE = RankIdentity(Role.DECODE, tp_rank=1, tp_size=2)
PREFILL = RankIdentity(Role.PREFILL, tp_rank=0, tp_size=2)
D = {"role": "decode", "rank": "dp0.cp0.tp1"}


@pytest.fixture
def relay_and_registry():
    registry = prom.CollectorRegistry()
    return ObserverRelay([PrometheusObserver(registry)]), registry


def test_step_sets_queue_depth_per_stage(relay_and_registry):
    relay, registry = relay_and_registry
    stages = np.array([0, 8, 8, 0, 8, 16], dtype=np.uint8)
    relay.call(
        "kvbridge_step",
        role=Role.DECODE,
        rank=DECODE,
        queued=6,
        reduced=6,
        stages=stages,
        fenced_bytes=4096,
    )
    get = registry.get_sample_value
    assert get("kvbridge_queue_depth", {**D, "stage": "transfer"}) == 3
    assert get("kvbridge_queue_depth", {**D, "stage": "prealloc"}) == 2
    assert get("kvbridge_queue_depth", {**D, "stage": "fenced"}) == 1
    assert get("kvbridge_fenced_bytes", D) == 4096
    relay.call(
        "kvbridge_step",
        role=Role.DECODE,
        rank=DECODE,
        queued=0,
        reduced=1,
        stages=stages[:0],
        fenced_bytes=0,
    )
    assert get("kvbridge_queue_depth", {**D, "stage": "transfer"}) == 0
    assert get("kvbridge_fenced_bytes", D) == 0
    assert get("kvbridge_steps_total", D) == 2
    relay.call(
        "kvbridge_step",
        role=Role.PREFILL,
        rank=PREFILL,
        queued=2,
        reduced=2,
        stages=np.array([1, 0], dtype=np.uint8),
        fenced_bytes=0,
    )
    p = {"role": "prefill", "rank": "dp0.cp0.tp0"}
    assert get("kvbridge_queue_depth", {**p, "stage": "inflight"}) == 1
    assert get("kvbridge_queue_depth", {**p, "stage": "bootstrap"}) == 1


def test_transfers_resolves_outcomes_and_drops(relay_and_registry):
    relay, registry = relay_and_registry
    for nbytes, seconds in ((1 << 20, 0.004), (3 << 20, 0.02)):
        relay.call(
            "kvbridge_transfer_finished",
            role=Role.DECODE,
            rank=DECODE,
            room=7,
            nbytes=nbytes,
            seconds=seconds,
        )
    relay.call("kvbridge_resolved", role=Role.DECODE, rank=DECODE, room=7, seconds=0.5, ok=True)
    relay.call("kvbridge_resolved", role=Role.DECODE, rank=DECODE, room=8, seconds=9.0, ok=False)
    finished = {"role": Role.DECODE, "rank": DECODE, "room": 7}
    relay.call(
        "kvbridge_request_finished",
        **finished,
        status=KVPoll.Success,
        reason=None,
        from_other_rank=False,
    )
    relay.call(
        "kvbridge_request_finished",
        **finished,
        status=KVPoll.Failed,
        reason="transfer not complete after waiting_timeout 5s",
        from_other_rank=False,
    )
    relay.call(
        "kvbridge_request_finished",
        **finished,
        status=KVPoll.Failed,
        reason="failed on another rank",
        from_other_rank=True,
    )
    relay.call(
        "kvbridge_control_dropped", role=Role.DECODE, rank=DECODE, count=3, cause="malformed"
    )
    get = registry.get_sample_value
    assert get("kvbridge_transfer_bytes_sum", D) == 4 << 20
    assert get("kvbridge_transfer_bytes_count", D) == 2
    assert get("kvbridge_transfer_seconds_sum", D) == pytest.approx(0.024)
    assert get("kvbridge_transfer_seconds_bucket", {**D, "le": "0.005"}) == 1
    assert get("kvbridge_resolve_seconds_count", D) == 1
    assert get("kvbridge_resolve_seconds_sum", D) == 0.5
    assert get("kvbridge_requests_total", {**D, "outcome": "success"}) == 1
    assert get("kvbridge_requests_total", {**D, "outcome": "failed"}) == 2
    assert get("kvbridge_failures_total", {**D, "cause": "timeout"}) == 1
    assert get("kvbridge_failures_total", {**D, "cause": "other_rank"}) == 1
    assert get("kvbridge_control_frames_dropped_total", {**D, "cause": "malformed"}) == 3


@pytest.mark.parametrize(
    ("reason", "other", "cause"),
    [
        ("timed out after 300s resolving or connecting to the prefill", False, "timeout"),
        ("lost connection to prefill 127.0.0.1:1", False, "lost_connection"),
        ("decode aborted: gone", False, "decode_aborted"),
        ("aux slot 3 holds room stamp 9", False, "aux_mismatch"),
        ("transport fake receiver_init raised ValueError: x", False, "transport"),
        ("anything", True, "other_rank"),
        (None, False, "other"),
    ],
)
def test_failure_cause(reason, other, cause):
    assert failure_cause(reason, other) == cause


def test_serve_exposes_the_registry():
    server = serve(0)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            r.read()
    finally:
        server.shutdown()
        server.server_close()


def test_core_imports_and_discovers_without_prometheus_client():
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import kvbridge, kvbridge.runtime.decode_node, kvbridge.runtime.prefill_node\n"
        "from kvbridge.observe import ObserverRelay\n"
        "relay = ObserverRelay(discover=True)\n"
        "assert 'prometheus' not in {n for n, _ in relay.plugin_manager.list_name_plugin()}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_rejected_and_untrusted_frames_are_counted_by_cause(relay_and_registry):
    from types import SimpleNamespace

    from kvbridge.observe import ControlLosses

    relay, registry = relay_and_registry
    receiver = SimpleNamespace(dropped=0, rejected=0)
    sender = SimpleNamespace(failed=0)
    untrusted = [0]
    losses = ControlLosses(relay, DECODE, receiver, [sender], untrusted=lambda: untrusted[0])
    receiver.rejected, untrusted[0], receiver.dropped = 3, 2, 1
    losses.check()
    get = registry.get_sample_value
    name = "kvbridge_control_frames_dropped_total"
    assert get(name, {**D, "cause": "unauthenticated"}) == 3
    assert get(name, {**D, "cause": "untrusted"}) == 2
    assert get(name, {**D, "cause": "malformed"}) == 1
    losses.check()  # nothing new: nothing more counted
    assert get(name, {**D, "cause": "unauthenticated"}) == 3


def test_parse_metrics_keys_samples_by_name_and_kept_labels() -> None:
    from kvbridge.testing import parse_metrics

    text = (
        "# HELP vllm:prompt_tokens_by_source Prompt tokens.\n"
        "# TYPE vllm:prompt_tokens_by_source counter\n"
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local"} 3.0\n'
        'vllm:prompt_tokens_by_source_total{engine="1",model_name="m",source="local"} 4.0\n'
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="remote"} 5.0\n'
    )
    kept = parse_metrics(text, ignore_labels=("engine", "model_name"))
    assert kept == {
        'vllm:prompt_tokens_by_source_total{source="local"}': 7.0,
        'vllm:prompt_tokens_by_source_total{source="remote"}': 5.0,
    }
    assert parse_metrics(text, labels=False) == {"vllm:prompt_tokens_by_source_total": 12.0}
