"""KvbridgeStats and KvbridgePromMetrics through vLLM's own stats classes (no server started):
worker figures -> aggregate over workers and steps -> the log line and Prometheus; and what a
real worker pair (Fake transport, in this process) records."""

from __future__ import annotations

import functools
import os
import pickle
import re
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

if os.environ.get("KVBRIDGE_VLLM_REQUIRED") == "1":
    import vllm  # noqa: F401  (fail, never skip, in CI)
else:
    pytest.importorskip("vllm")

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorLogging,
    KVConnectorProm,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlPromMetrics
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from kvbridge import AuxLayout, RankIdentity, Role, TransferConfig
from kvbridge.bootstrap.server import BootstrapServer
from kvbridge.observe import ObserverRelay
from kvbridge.protocol.columns import TRANSFERRING
from kvbridge.protocol.prefill import PrefillQueue, PrefillRequest
from kvbridge_vllm import KvbridgeConnector
from kvbridge_vllm.config import ConnectorConfig
from kvbridge_vllm.scheduler import KvbridgeMetadata, RecvRoom, SendRoom
from kvbridge_vllm.stats import (
    HANDOFFS,
    SERIES,
    KvbridgePromMetrics,
    KvbridgeStats,
    NodeFigures,
    abort_kind,
    count,
)
from kvbridge_vllm.worker import CANCELLED, ENDED_IN_VLLM, NOT_OFFERED, KvbridgeWorker

LABELS = {"model_name": "tiny", "engine": "0"}
#: vLLM's NixlConnector series kvbridge has no counterpart for (README, Metrics).
NO_COUNTERPART = {"vllm:nixl_num_descriptors", "vllm:nixl_num_notifications_after_expiry"}


def _kv_config(role: str = "kv_consumer", **extra: Any) -> KVTransferConfig:
    return KVTransferConfig(
        kv_connector="KvbridgeConnector",
        kv_connector_module_path="kvbridge_vllm",
        kv_role=role,
        kv_connector_extra_config=extra,
    )


def _worker_data(*events: dict[str, float]) -> dict[str, Any]:
    """What one worker's ``take_stats`` returns after these ``_count`` calls."""
    worker = object.__new__(KvbridgeWorker)
    worker._lock = threading.Lock()
    worker._stats = {}
    for values in events:
        worker._count(**values)
    return worker.take_stats()


def _registry_classes(registry: CollectorRegistry) -> dict[type, Any]:
    return {
        Gauge: functools.partial(Gauge, registry=registry),
        Counter: functools.partial(Counter, registry=registry),
        Histogram: functools.partial(Histogram, registry=registry),
    }


def _prom(role: str = "kv_consumer", **extra: Any) -> tuple[KVConnectorProm, CollectorRegistry]:
    """vLLM's KVConnectorProm as PrometheusStatLogger builds it, on a private registry."""
    registry = CollectorRegistry()
    classes = _registry_classes(registry)

    class Prom(KVConnectorProm):
        _gauge_cls = classes[Gauge]
        _counter_cls = classes[Counter]
        _histogram_cls = classes[Histogram]

    config = types.SimpleNamespace(kv_transfer_config=_kv_config(role, **extra))
    return Prom(config, ["model_name", "engine"], {0: ["tiny", "0"]}), registry


def _shape(
    registry: CollectorRegistry,
) -> dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]]:
    """Each series of ``registry`` (exposed name): its type, labels and bucket bounds."""
    shapes = {}
    for family in registry.collect():
        labels: set[str] = set()
        bounds: list[float] = []
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
            if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf":
                bounds.append(float(sample.labels["le"]))
        shapes[family.name] = (family.type, tuple(sorted(labels)), tuple(bounds))
    return shapes


# -- figures of one worker ---------------------------------------------------------------------


def test_worker_count_keeps_sums_lists_and_each_handoff() -> None:
    data = _worker_data(
        {"transfers": 1, "bytes": 1000, "seconds": 0.010},
        {"failures": 1},
        {"expired": 1},
        {"transfers": 1, "bytes": 3000, "seconds": 0.030},
    )
    assert data == {
        "transfers": 2.0,
        "bytes": 4000.0,
        "seconds": 0.04,
        "failures": 1.0,
        "expired": 1.0,
        HANDOFFS: [0.010, 0.030],
    }
    prefill = _worker_data(
        {"bytes": 500, "post_seconds": 0.001},
        {"xfer_seconds": 0.002, "xfer_bytes": 564},
        {"transfers": 1, "seconds": 0.002},
    )
    assert prefill == {
        "bytes": 500.0,
        "post_seconds": [0.001],
        "xfer_seconds": [0.002],
        "xfer_bytes": [564.0],
        "transfers": 1.0,
        "seconds": 0.002,
        HANDOFFS: [0.002],
    }
    plain: dict[str, Any] = {}
    count(plain, failures=1)
    assert plain == {"failures": 1.0}  # no handoff: no list
    with pytest.raises(ValueError, match="unknown kvbridge-vllm figure 'failure'"):
        count(plain, failure=1)


def _prefill_reason_after(timeout_stage: str) -> str:
    """The reason kvbridge's own prefill queue gives a room that timed out in that stage."""
    queue = PrefillQueue(authoritative=True, bootstrap_timeout=1.0, waiting_timeout=1.0)
    queue.add([PrefillRequest(7)], now=0.0)
    in_flight = np.full(1, TRANSFERRING, np.uint8)  # the transport's view: never done
    if timeout_stage == "sending":
        queue.metadata_complete(7)
        assert queue.apply(queue.local_statuses(in_flight, {}, now=0.0)).ready == (7,)
        queue.sent(7, is_last=True, now=0.0)
    statuses = queue.local_statuses(in_flight, {}, now=5.0)
    (aborted,) = queue.apply(statuses).aborted
    return aborted.reason


def test_aborted_rooms_are_told_apart_as_nixl_does() -> None:
    # Decode never came within bootstrap_timeout: NIXL's expired KV lease.
    never_asked = _prefill_reason_after("bootstrap")
    assert abort_kind(never_asked, CANCELLED) == "expired"
    # Sent but never acknowledged: a failed transfer, like every transport or peer failure.
    assert abort_kind(_prefill_reason_after("sending"), CANCELLED) == "failures"
    assert abort_kind("transport fake sender_send raised OSError: gone", CANCELLED) == "failures"
    # vLLM ended the request, here or on the peer (whose node forwards the reason).
    assert abort_kind(ENDED_IN_VLLM, CANCELLED) == "cancelled"
    assert abort_kind(f"decode aborted: decode d-1: {ENDED_IN_VLLM}", CANCELLED) == "cancelled"
    assert abort_kind(f"prefill 127.0.0.1:1/dp0/tp0: {NOT_OFFERED}", CANCELLED) == "cancelled"


def test_node_figures_through_kvbridges_observer_relay() -> None:
    recorded: list[dict[str, float]] = []
    relay = ObserverRelay([NodeFigures(lambda **v: recorded.append(v))])
    prefill, decode = RankIdentity(Role.PREFILL), RankIdentity(Role.DECODE)
    finished = {"room": 1, "nbytes": 4160}
    relay.call(
        "kvbridge_transfer_finished", role=Role.PREFILL, rank=prefill, seconds=0.02, **finished
    )
    # Decode receives: the writer's figures are prefill's.
    relay.call(
        "kvbridge_transfer_finished", role=Role.DECODE, rank=decode, seconds=0.03, **finished
    )
    dropped = {"role": Role.DECODE, "rank": decode}
    relay.call("kvbridge_control_dropped", count=2, cause="send_failed", **dropped)
    relay.call("kvbridge_control_dropped", count=5, cause="malformed", **dropped)
    assert recorded == [{"xfer_seconds": 0.02, "xfer_bytes": 4160}, {"failed_notifications": 2}]


# -- across workers, steps and processes -------------------------------------------------------


def test_aggregate_reduce_and_the_log_line() -> None:
    rank0 = KvbridgeConnector.build_kv_connector_stats(
        _worker_data(
            *(
                {
                    "transfers": 1,
                    "bytes": 2**20,
                    "seconds": s / 1000,
                    "xfer_seconds": s / 1000,
                    "xfer_bytes": 2**20,
                    "post_seconds": s / 10_000,
                }
                for s in range(1, 10)
            )
        )
    )
    rank1 = KvbridgeConnector.build_kv_connector_stats(
        _worker_data(
            {
                "transfers": 1,
                "bytes": 2**20,
                "seconds": 0.100,
                "xfer_seconds": 0.100,
                "xfer_bytes": 2**20,
                "post_seconds": 0.010,
            },
            {"failures": 1},
            {"failed_notifications": 2},
            {"expired": 3},
            {"cancelled": 1},
        )
    )
    total = rank0.aggregate(rank1)
    assert total is rank0
    assert total.handoffs == [s / 1000 for s in range(1, 10)] + [0.100]
    assert total.reduce() == {
        "Num successful transfers": 10,
        "Avg xfer time (ms)": 14.5,
        "P90 xfer time (ms)": 18.1,
        "Avg post time (ms)": 1.45,
        "P90 post time (ms)": 1.81,
        "Avg MB per transfer": 1.0,
        "Throughput (MB/s)": round(10 / 0.145, 3),
        "Num failed transfers": 3,  # rooms and notifications, as NixlConnector groups them
        "Num KV expired reqs": 3,
        "Num cancelled": 1,
        "MB moved": 10.0,
        "Avg handoff (ms)": 14.5,
        "P90 handoff (ms)": 18.1,
    }
    assert not total.is_empty()
    total.reset()
    assert total.is_empty()
    assert set(total.reduce().values()) == {0}
    assert KvbridgeStats().is_empty()
    for only in ("failures", "expired", "cancelled", "failed_notifications"):
        assert not KvbridgeConnector.build_kv_connector_stats({only: 1.0}).is_empty()
    assert not KvbridgeConnector.build_kv_connector_stats({"post_seconds": [0.1]}).is_empty()

    # vLLM's own interval accumulator and log line (the API server side); decode records
    # no per-transfer figures of the writer: those stay 0.
    logging_ = KVConnectorLogging(_kv_config())
    logging_.observe(_worker_data({"transfers": 1, "bytes": 2**21, "seconds": 0.004}))
    logging_.observe(_worker_data({"transfers": 1, "bytes": 2**21, "seconds": 0.008}))
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert lines == [
        "KV Transfer metrics: Num successful transfers=2, Avg xfer time (ms)=0.0, "
        "P90 xfer time (ms)=0.0, Avg post time (ms)=0.0, P90 post time (ms)=0.0, "
        "Avg MB per transfer=0.0, Throughput (MB/s)=0.0, Num failed transfers=0, "
        "Num KV expired reqs=0, Num cancelled=0, MB moved=4.0, Avg handoff (ms)=6.0, "
        "P90 handoff (ms)=7.6"
    ]


def test_aggregate_leaves_the_observed_data_alone() -> None:
    # vLLM gives the same dict to the log accumulator and to Prometheus.
    first = _worker_data({"transfers": 1, "bytes": 10, "seconds": 0.5, "xfer_seconds": 0.5})
    second = _worker_data({"transfers": 1, "bytes": 10, "seconds": 0.7, "xfer_seconds": 0.7})
    acc = KvbridgeConnector.build_kv_connector_stats(first)
    acc.aggregate(KvbridgeConnector.build_kv_connector_stats(second))
    assert first[HANDOFFS] == [0.5] and second[HANDOFFS] == [0.7]
    assert first["xfer_seconds"] == [0.5] and second["xfer_seconds"] == [0.7]
    assert first["transfers"] == 1.0


def test_data_crosses_processes() -> None:
    stats = KvbridgeConnector.build_kv_connector_stats(
        _worker_data(
            {"transfers": 1, "bytes": 7, "seconds": 0.25, "xfer_seconds": 0.2},
            {"xfer_bytes": 71, "post_seconds": 0.001, "expired": 1},
        )
    )
    # Worker -> scheduler process: the stats object is pickled.
    again = pickle.loads(pickle.dumps(stats))
    assert isinstance(again, KvbridgeStats) and again.data == stats.data
    # Scheduler -> API server: ``data`` inside SchedulerStats, vLLM's msgpack.
    sent = SchedulerStats(kv_connector_stats=stats.to_dict())
    got = MsgpackDecoder(SchedulerStats).decode(MsgpackEncoder().encode(sent))
    assert got.kv_connector_stats == stats.data


# -- Prometheus --------------------------------------------------------------------------------


def _observe_known_figures(prom: KVConnectorProm) -> None:
    prom.observe(
        _worker_data(
            {"transfers": 1, "bytes": 1 << 20, "seconds": 0.004},
            {"xfer_seconds": 0.004, "xfer_bytes": (1 << 20) + 64, "post_seconds": 0.0008},
            {"transfers": 1, "bytes": 1 << 20, "seconds": 0.2},
            {"xfer_seconds": 0.2, "xfer_bytes": (1 << 20) + 64, "post_seconds": 0.002},
            {"failures": 1},
        )
    )
    prom.observe({"failures": 2.0, "failed_notifications": 1.0})  # failures only
    prom.observe({"expired": 1.0, "cancelled": 4.0})
    prom.observe(KvbridgeStats().to_dict())  # and an empty interval


def test_prometheus_series() -> None:
    prom, registry = _prom()
    assert isinstance(prom.prom_metrics, KvbridgePromMetrics)
    _observe_known_figures(prom)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {**LABELS, **labels})

    assert value("vllm:kvbridge_handoff_seconds_count") == 2
    assert value("vllm:kvbridge_handoff_seconds_sum") == pytest.approx(0.204)
    assert value("vllm:kvbridge_handoff_seconds_bucket", le="0.005") == 1
    assert value("vllm:kvbridge_handoff_seconds_bucket", le="0.25") == 2
    assert value("vllm:kvbridge_transferred_bytes_total") == 2 << 20
    assert value("vllm:kvbridge_xfer_time_seconds_count") == 2
    assert value("vllm:kvbridge_xfer_time_seconds_sum") == pytest.approx(0.204)
    assert value("vllm:kvbridge_xfer_time_seconds_bucket", le="0.005") == 1
    assert value("vllm:kvbridge_xfer_time_seconds_bucket", le="0.2") == 2
    assert value("vllm:kvbridge_post_time_seconds_bucket", le="0.001") == 1
    assert value("vllm:kvbridge_post_time_seconds_sum") == pytest.approx(0.0028)
    assert value("vllm:kvbridge_bytes_transferred_sum") == 2 * ((1 << 20) + 64)
    assert value("vllm:kvbridge_bytes_transferred_bucket", le=floatToGoString(2**21)) == 2
    assert value("vllm:kvbridge_bytes_transferred_bucket", le=floatToGoString(2**19)) == 0
    # NixlConnector counts notification failures among the failed transfers too.
    assert value("vllm:kvbridge_num_failed_transfers_total") == 4
    assert value("vllm:kvbridge_num_failed_notifications_total") == 1
    assert value("vllm:kvbridge_num_kv_expired_reqs_total") == 1
    assert value("vllm:kvbridge_num_cancelled_transfers_total") == 4
    assert not [n for n in _shape(registry) if n.startswith("vllm:nixl_")]
    doc = {m.name: m.documentation for m in registry.collect()}
    assert "add -> commit" in doc["vllm:kvbridge_handoff_seconds"]
    _, prefill = _prom("kv_producer")
    doc = {m.name: m.documentation for m in prefill.collect()}
    assert "send -> finished" in doc["vllm:kvbridge_handoff_seconds"]


def test_series_match_nixl_connectors_but_for_the_prefix() -> None:
    """Each ``vllm:nixl_*`` series vLLM's own NixlPromMetrics registers has a kvbridge one of
    the same type, labels and buckets, named ``vllm:kvbridge_*``, or ``vllm:nixl_*`` itself
    with ``metric_names = "nixl"``."""
    nixl_registry = CollectorRegistry()
    NixlPromMetrics(
        types.SimpleNamespace(kv_transfer_config=_kv_config()),
        _registry_classes(nixl_registry),
        ["model_name", "engine"],
        {0: ["tiny", "0"]},
    )
    theirs = _shape(nixl_registry)
    assert set(theirs) > NO_COUNTERPART  # both exist in this vLLM
    _, ours_registry = _prom()
    ours = _shape(ours_registry)
    _, nixl_named_registry = _prom(metric_names="nixl")
    nixl_named = _shape(nixl_named_registry)
    for name, shape in theirs.items():
        if name in NO_COUNTERPART:
            assert name not in nixl_named
            continue
        assert ours[name.replace("vllm:nixl_", "vllm:kvbridge_")] == shape, name
        assert nixl_named[name] == shape, name
    kvbridge_only = {n for n in ours if n.replace("vllm:kvbridge_", "vllm:nixl_") not in theirs}
    assert kvbridge_only == {
        "vllm:kvbridge_handoff_seconds",
        "vllm:kvbridge_transferred_bytes",
        "vllm:kvbridge_num_cancelled_transfers",
    }
    assert set(nixl_named) == (set(theirs) - NO_COUNTERPART) | kvbridge_only
    assert {s.nixl for s in SERIES if s.nixl} == set(theirs) - NO_COUNTERPART


def test_nixl_names_record_the_same_values() -> None:
    default, default_registry = _prom()
    nixl, nixl_registry = _prom(metric_names="nixl")
    _observe_known_figures(default)
    _observe_known_figures(nixl)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {
            (s.name.replace("vllm:nixl_", "vllm:kvbridge_"), s.labels.get("le", "")): s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(nixl_registry) == samples(default_registry)
    assert nixl_registry.get_sample_value("vllm:nixl_num_kv_expired_reqs_total", LABELS) == 1


@pytest.mark.parametrize("bad", ["NIXL", "prometheus", "", True, 1, ["nixl"]])
def test_bad_metric_names_are_refused(bad: Any) -> None:
    expected = re.escape(f"metric_names must be one of 'kvbridge', 'nixl', got {bad!r}")
    with pytest.raises(ValueError, match=expected):
        ConnectorConfig.from_extra({"metric_names": bad})
    with pytest.raises(ValueError, match="metric_names must be one of"):
        _prom(metric_names=bad)  # the API server's side refuses it too
    assert ConnectorConfig.from_extra({}).metric_names == "kvbridge"
    assert ConnectorConfig.from_extra({"metric_names": "nixl"}).metric_names == "nixl"


# -- what a real worker pair records -----------------------------------------------------------

BLOCK_SIZE = 16
NUM_BLOCKS = 32
HEADS, HEAD_SIZE, LAYERS = 2, 8, 2
#: vLLM's CPU attention: [num_blocks, num_kv_heads, block_size, 2 * head_size] per layer.
BLOCK_BYTES = LAYERS * HEADS * BLOCK_SIZE * 2 * HEAD_SIZE * 4


def _worker(
    monkeypatch: pytest.MonkeyPatch, role: str, transfer: TransferConfig, port: int
) -> KvbridgeWorker:
    import vllm.distributed.parallel_state as parallel_state

    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 1)
    vllm_config = types.SimpleNamespace(
        kv_transfer_config=types.SimpleNamespace(kv_role=role),
        cache_config=types.SimpleNamespace(block_size=BLOCK_SIZE, num_gpu_blocks=NUM_BLOCKS),
        model_config=None,
    )
    config = ConnectorConfig(transfer=transfer, bootstrap_port=port, aux_slots=8)
    worker = KvbridgeWorker(vllm_config, config, engine_id=role)
    caches = {
        f"layer.{i}": torch.zeros(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
        for i in range(LAYERS)
    }
    worker.register_kv_caches(caches)
    return worker


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[KvbridgeWorker, KvbridgeWorker]]:
    # bootstrap_timeout: how long prefill holds a room no decode asks for (expiry).
    transfer = TransferConfig(transport="fake", bind_host="127.0.0.1", bootstrap_timeout=1.0)
    server = BootstrapServer("127.0.0.1", 0).start()
    port = int(server.address.rsplit(":", 1)[1])
    prefill = _worker(monkeypatch, "kv_producer", transfer, port)
    decode = _worker(monkeypatch, "kv_consumer", transfer, port)
    try:
        yield prefill, decode
    finally:
        decode.shutdown()
        prefill.shutdown()
        server.stop()


def _wait(what: str, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _collect(worker: KvbridgeWorker, into: dict[str, set[str]]) -> Callable[[], dict[str, set]]:
    def poll() -> dict[str, set[str]]:
        sending, recving, failed = worker.transfer_results()
        into["sending"] |= sending
        into["recving"] |= recving
        into["failed"] |= failed
        return into

    return poll


def test_a_worker_pair_records_each_figure_where_it_is_known(
    pair: tuple[KvbridgeWorker, KvbridgeWorker],
) -> None:
    prefill, decode = pair
    boot = prefill.config.bootstrap_addr
    p_done: dict[str, set[str]] = {"sending": set(), "recving": set(), "failed": set()}
    d_done: dict[str, set[str]] = {"sending": set(), "recving": set(), "failed": set()}
    p_poll, d_poll = _collect(prefill, p_done), _collect(decode, d_done)

    # One handoff of 3 blocks.
    prefill.start_load_kv(KvbridgeMetadata(send=[SendRoom("p-ok", 11, [4, 5, 6])]))
    decode.start_load_kv(
        KvbridgeMetadata(recv=[RecvRoom("d-ok", 11, [1, 2, 3], bootstrap_addr=boot)])
    )
    _wait("the handoff", lambda: "p-ok" in p_poll()["sending"] and "d-ok" in d_poll()["recving"])
    assert not d_done["failed"]
    # A room whose decode never asks: prefill frees it after bootstrap_timeout (expired).
    prefill.start_load_kv(KvbridgeMetadata(send=[SendRoom("p-expired", 12, [7])]))
    # A decode room vLLM ends while it waits for its KV (cancelled on both sides).
    decode.start_load_kv(KvbridgeMetadata(recv=[RecvRoom("d-gone", 13, [8], bootstrap_addr=boot)]))
    decode.start_load_kv(KvbridgeMetadata(abort=[("d-gone", 13)]))
    _wait("the cancel", lambda: "d-gone" in d_poll()["failed"])
    _wait("the expiry", lambda: "p-expired" in p_poll()["sending"])

    aux_row = AuxLayout().row_bytes
    p, d = prefill.take_stats(), decode.take_stats()
    # The writer's figures, from its node: every descriptor it wrote (3 blocks, aux row).
    assert p["xfer_bytes"] == [3 * BLOCK_BYTES + aux_row]
    assert len(p["xfer_seconds"]) == 1 and 0 < p["xfer_seconds"][0] < 30
    assert len(p["post_seconds"]) == 1 and 0 < p["post_seconds"][0] <= p["xfer_seconds"][0]
    assert p["transfers"] == 1 and p["bytes"] == 3 * BLOCK_BYTES
    assert p["expired"] == 1
    assert "failures" not in p
    # Decode receives: its own handoff and bytes, none of the writer's figures.
    assert d["transfers"] == 1 and d["bytes"] == 3 * BLOCK_BYTES and len(d[HANDOFFS]) == 1
    assert d["cancelled"] == 1
    assert not {"xfer_seconds", "xfer_bytes", "post_seconds", "failures", "expired"} & set(d)
