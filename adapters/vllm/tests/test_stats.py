"""KvbridgeStats and KvbridgePromMetrics through vLLM's own stats classes (no server started):
worker figures -> aggregate over workers and steps -> the log line and Prometheus."""

from __future__ import annotations

import functools
import os
import pickle
import threading
import types
from typing import Any

import pytest

if os.environ.get("KVBRIDGE_VLLM_REQUIRED") == "1":
    import vllm  # noqa: F401  (fail, never skip, in CI)
else:
    pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorLogging,
    KVConnectorProm,
)
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from kvbridge_vllm import KvbridgeConnector
from kvbridge_vllm.stats import HANDOFFS, KvbridgePromMetrics, KvbridgeStats, count
from kvbridge_vllm.worker import KvbridgeWorker

LABELS = {"model_name": "tiny", "engine": "0"}


def _kv_config(role: str = "kv_consumer") -> KVTransferConfig:
    return KVTransferConfig(
        kv_connector="KvbridgeConnector", kv_connector_module_path="kvbridge_vllm", kv_role=role
    )


def _worker_data(*events: dict[str, float]) -> dict[str, Any]:
    """What one worker's ``take_stats`` returns after these ``_count`` calls."""
    worker = object.__new__(KvbridgeWorker)
    worker._lock = threading.Lock()
    worker._stats = {}
    for values in events:
        worker._count(**values)
    return worker.take_stats()


def _prom(role: str = "kv_consumer") -> tuple[KVConnectorProm, CollectorRegistry]:
    """vLLM's KVConnectorProm as PrometheusStatLogger builds it, on a private registry."""
    registry = CollectorRegistry()

    class Prom(KVConnectorProm):
        _gauge_cls = functools.partial(Gauge, registry=registry)
        _counter_cls = functools.partial(Counter, registry=registry)
        _histogram_cls = functools.partial(Histogram, registry=registry)

    config = types.SimpleNamespace(kv_transfer_config=_kv_config(role))
    return Prom(config, ["model_name", "engine"], {0: ["tiny", "0"]}), registry


def test_worker_count_keeps_sums_and_each_handoff() -> None:
    data = _worker_data(
        {"transfers": 1, "bytes": 1000, "seconds": 0.010},
        {"failures": 1},
        {"transfers": 1, "bytes": 3000, "seconds": 0.030},
    )
    assert data == {
        "transfers": 2.0,
        "bytes": 4000.0,
        "seconds": 0.04,
        "failures": 1.0,
        HANDOFFS: [0.010, 0.030],
    }
    prefill = _worker_data({"bytes": 500}, {"transfers": 1, "seconds": 0.002})
    assert prefill == {"bytes": 500.0, "transfers": 1.0, "seconds": 0.002, HANDOFFS: [0.002]}
    plain: dict[str, Any] = {}
    count(plain, failures=1)
    assert plain == {"failures": 1.0}  # no handoff: no list


def test_aggregate_reduce_and_the_log_line() -> None:
    rank0 = KvbridgeConnector.build_kv_connector_stats(
        _worker_data(*({"transfers": 1, "bytes": 1e6, "seconds": s / 1000} for s in range(1, 10)))
    )
    rank1 = KvbridgeConnector.build_kv_connector_stats(
        _worker_data({"transfers": 1, "bytes": 1e6, "seconds": 0.100}, {"failures": 1})
    )
    total = rank0.aggregate(rank1)
    assert total is rank0
    assert total.handoffs == [s / 1000 for s in range(1, 10)] + [0.100]
    assert total.reduce() == {
        "Transfers": 10,
        "Failures": 1,
        "MB moved": 10.0,
        "Avg handoff (ms)": 14.5,
        "P90 handoff (ms)": 18.1,
    }
    assert not total.is_empty()
    total.reset()
    assert total.is_empty()
    assert total.reduce()["P90 handoff (ms)"] == 0.0
    assert KvbridgeStats().is_empty()
    assert not KvbridgeConnector.build_kv_connector_stats({"failures": 1.0}).is_empty()

    # vLLM's own interval accumulator and log line (the API server side).
    logging_ = KVConnectorLogging(_kv_config())
    logging_.observe(_worker_data({"transfers": 1, "bytes": 2e6, "seconds": 0.004}))
    logging_.observe(_worker_data({"transfers": 1, "bytes": 2e6, "seconds": 0.008}))
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert lines == [
        "KV Transfer metrics: Transfers=2, Failures=0, MB moved=4.0, Avg handoff (ms)=6.0, "
        "P90 handoff (ms)=7.6"
    ]


def test_aggregate_leaves_the_observed_data_alone() -> None:
    # vLLM gives the same dict to the log accumulator and to Prometheus.
    first = _worker_data({"transfers": 1, "bytes": 10, "seconds": 0.5})
    second = _worker_data({"transfers": 1, "bytes": 10, "seconds": 0.7})
    acc = KvbridgeConnector.build_kv_connector_stats(first)
    acc.aggregate(KvbridgeConnector.build_kv_connector_stats(second))
    assert first[HANDOFFS] == [0.5] and second[HANDOFFS] == [0.7]
    assert first["transfers"] == 1.0


def test_data_crosses_processes() -> None:
    stats = KvbridgeConnector.build_kv_connector_stats(
        _worker_data({"transfers": 1, "bytes": 7, "seconds": 0.25})
    )
    # Worker -> scheduler process: the stats object is pickled.
    again = pickle.loads(pickle.dumps(stats))
    assert isinstance(again, KvbridgeStats) and again.data == stats.data
    # Scheduler -> API server: ``data`` inside SchedulerStats, vLLM's msgpack.
    sent = SchedulerStats(kv_connector_stats=stats.to_dict())
    got = MsgpackDecoder(SchedulerStats).decode(MsgpackEncoder().encode(sent))
    assert got.kv_connector_stats == stats.data


def test_prometheus_series() -> None:
    prom, registry = _prom()
    assert isinstance(prom.prom_metrics, KvbridgePromMetrics)
    prom.observe(
        _worker_data(
            {"transfers": 1, "bytes": 1 << 20, "seconds": 0.004},
            {"transfers": 1, "bytes": 1 << 20, "seconds": 0.2},
            {"failures": 1},
        )
    )
    prom.observe({"failures": 2.0})  # an interval with failures only
    prom.observe(KvbridgeStats().to_dict())  # and an empty one

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {**LABELS, **labels})

    assert value("vllm:kvbridge_handoff_seconds_count") == 2
    assert value("vllm:kvbridge_handoff_seconds_sum") == pytest.approx(0.204)
    assert value("vllm:kvbridge_handoff_seconds_bucket", le="0.005") == 1
    assert value("vllm:kvbridge_handoff_seconds_bucket", le="0.25") == 2
    assert value("vllm:kvbridge_transferred_bytes_total") == 2 << 20
    assert value("vllm:kvbridge_num_failed_transfers_total") == 3
    doc = {m.name: m.documentation for m in registry.collect()}
    assert "add -> commit" in doc["vllm:kvbridge_handoff_seconds"]
    _, prefill = _prom("kv_producer")
    doc = {m.name: m.documentation for m in prefill.collect()}
    assert "send -> finished" in doc["vllm:kvbridge_handoff_seconds"]
