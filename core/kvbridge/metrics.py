"""Prometheus metrics for kvbridge: an observer plugin (``pip install kvbridge[metrics]``).

Installed with the extra, the observer registers itself through the ``kvbridge.observers``
entry point, so every node in the process records into ``prometheus_client``'s default
registry. Engines that already serve that registry (vLLM, SGLang) show kvbridge's metrics on
their own ``/metrics`` page; :func:`serve` starts a server for processes that do not. With
several processes (one per rank), set ``PROMETHEUS_MULTIPROC_DIR`` before they start and serve
the directory from one of them (``serve(port, multiprocess_dir=...)``), as ``kvbridge demo
--metrics-port`` does.

What it exports (labels ``role`` = ``prefill``/``decode`` and ``rank`` = ``dpX.cpY.tpZ``):

=====================================================  =========================================
``kvbridge_transfer_seconds`` (histogram)              decode: metadata sent -> commit; prefill:
                                                       first send -> finished
``kvbridge_transfer_bytes`` (histogram)                bytes per request per rank (``_sum`` is
                                                       the byte counter)
``kvbridge_resolve_seconds`` (histogram)               decode: add -> prefill ranks resolved
``kvbridge_requests_total{outcome}``                   ``success`` / ``failed``
``kvbridge_failures_total{cause}``                     failed requests by cause (see
                                                       :func:`failure_cause`)
``kvbridge_queue_depth{stage}`` (gauge)                live requests per stage after each step
``kvbridge_control_frames_dropped_total{cause}``       ``malformed`` / ``send_failed``
``kvbridge_steps_total``                               steps that reduced something
=====================================================  =========================================

Every hook runs on the scheduler thread; the per-step cost is one ``bincount`` and a pre-bound
counter update, plus a gauge update for each stage whose depth changed (a few microseconds,
measured in ``benchmarks/handoff.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

try:
    import prometheus_client as prom
except ImportError as exc:  # pragma: no cover - exercised by the no-extra test
    raise ImportError(
        "kvbridge.metrics needs prometheus_client: pip install 'kvbridge[metrics]'"
    ) from exc

from kvbridge.status import KVPoll
from kvbridge.transport.hookspecs import hookimpl
from kvbridge.types import RankIdentity, Role

log = logging.getLogger("kvbridge")

SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(14, 34, 2))  # 16 KiB .. 8 GiB, x4
#: Stage names by role, for stage value 0 and any other value (see ``kvbridge_step``).
#: Stage names by the queue's stage values (see ``kvbridge_step``).
STAGES = {
    Role.DECODE: ((0, "prealloc"), (8, "transfer"), (16, "fenced")),
    Role.PREFILL: ((0, "bootstrap"), (1, "inflight")),
}

# (substring of the reason, cause), first match wins; checked in order.
_CAUSES = (
    ("failed on another rank", "other_rank"),
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("lost connection", "lost_connection"),
    ("decode aborted", "decode_aborted"),
    ("room stamp", "aux_mismatch"),
    ("bootstrap", "bootstrap"),
    ("resolv", "bootstrap"),
    ("dp rank", "bootstrap"),
    ("transport", "transport"),
    ("peer", "transport"),
    ("prefill", "prefill"),
)


def failure_cause(reason: str | None, from_other_rank: bool = False) -> str:
    """A small, fixed set of causes for the ``cause`` label (reasons are free text)."""
    if from_other_rank:
        return "other_rank"
    text = (reason or "").lower()
    for needle, cause in _CAUSES:
        if needle in text:
            return cause
    return "other"


def rank_label(rank: RankIdentity) -> str:
    return f"dp{rank.dp_rank}.cp{rank.cp_rank}.tp{rank.tp_rank}"


class _Bound:
    """One (role, rank)'s metric children, bound once: ``labels()`` costs a lock and a dict."""

    def __init__(self, obs: PrometheusObserver, role: Role, rank: RankIdentity) -> None:
        labels = (role.value, rank_label(rank))
        self.transfer_seconds = obs.transfer_seconds.labels(*labels)
        self.transfer_bytes = obs.transfer_bytes.labels(*labels)
        self.resolve_seconds = obs.resolve_seconds.labels(*labels)
        self.success = obs.requests.labels(*labels, "success")
        self.failed = obs.requests.labels(*labels, "failed")
        self.steps = obs.steps.labels(*labels)
        self.stage_values = tuple(v for v, _ in STAGES[role])
        self.bins = max(self.stage_values) + 1
        self.zeros = [0] * self.bins
        self.depth_gauges = tuple(obs.queue_depth.labels(*labels, n) for _, n in STAGES[role])
        self.fenced_bytes = obs.fenced_bytes.labels(*labels)
        self.labels = labels
        self.depth: tuple[int, ...] = ()  # last depths set: unchanged depths cost nothing
        self.fenced = -1


class PrometheusObserver:
    """The observer plugin; one per registry (the module's :data:`observer` uses the default)."""

    def __init__(self, registry: Any = None, namespace: str = "kvbridge") -> None:
        registry = prom.REGISTRY if registry is None else registry
        common = {"namespace": namespace, "registry": registry}
        roles = ["role", "rank"]
        self.transfer_seconds = prom.Histogram(
            "transfer_seconds",
            "KV transfer time per request and rank (decode: metadata sent to commit; "
            "prefill: first send to finished)",
            roles,
            buckets=SECONDS_BUCKETS,
            **common,
        )
        self.transfer_bytes = prom.Histogram(
            "transfer_bytes",
            "KV and aux bytes per request and rank",
            roles,
            buckets=BYTES_BUCKETS,
            **common,
        )
        self.resolve_seconds = prom.Histogram(
            "resolve_seconds",
            "Decode: time from add to knowing the prefill ranks (bootstrap look-up)",
            roles,
            buckets=SECONDS_BUCKETS,
            **common,
        )
        self.requests = prom.Counter(
            "requests", "Requests that left kvbridge", [*roles, "outcome"], **common
        )
        self.failures = prom.Counter(
            "failures", "Failed requests by cause", [*roles, "cause"], **common
        )
        self.queue_depth = prom.Gauge(
            "queue_depth",
            "Live requests per queue stage after the last step",
            [*roles, "stage"],
            multiprocess_mode="livesum",
            **common,
        )
        self.control_dropped = prom.Counter(
            "control_frames_dropped",
            "Control-channel frames lost (malformed on receipt, or refused on send)",
            [*roles, "cause"],
            **common,
        )
        self.fenced_bytes = prom.Gauge(
            "fenced_bytes",
            "Decode KV bytes held by the abort fence (aborted, waiting for the prefill to stop)",
            roles,
            multiprocess_mode="livesum",
            **common,
        )
        self.steps = prom.Counter(
            "steps", "Scheduler steps that reduced something", roles, **common
        )
        self._bound: dict[tuple[Role, RankIdentity], _Bound] = {}

    def _get(self, role: Role, rank: RankIdentity) -> _Bound:
        bound = self._bound.get((role, rank))
        if bound is None:
            bound = self._bound[(role, rank)] = _Bound(self, role, rank)
        return bound

    @hookimpl
    def kvbridge_step(
        self, role: Role, rank: RankIdentity, queued: int, stages: np.ndarray, fenced_bytes: int
    ) -> None:
        bound = self._get(role, rank)
        # One pass over the column for every stage (this runs on every step).
        counts = np.bincount(stages, minlength=bound.bins).tolist() if len(stages) else bound.zeros
        depth = tuple(counts[v] for v in bound.stage_values)
        if depth != bound.depth:
            bound.depth = depth
            for gauge, value in zip(bound.depth_gauges, depth, strict=True):
                gauge.set(value)
        if fenced_bytes != bound.fenced:
            bound.fenced = fenced_bytes
            bound.fenced_bytes.set(fenced_bytes)
        bound.steps.inc()

    @hookimpl
    def kvbridge_transfer_finished(
        self, role: Role, rank: RankIdentity, nbytes: int, seconds: float
    ) -> None:
        bound = self._get(role, rank)
        bound.transfer_seconds.observe(seconds)
        bound.transfer_bytes.observe(nbytes)

    @hookimpl
    def kvbridge_resolved(self, role: Role, rank: RankIdentity, seconds: float, ok: bool) -> None:
        if ok:
            self._get(role, rank).resolve_seconds.observe(seconds)

    @hookimpl
    def kvbridge_request_finished(
        self,
        role: Role,
        rank: RankIdentity,
        status: KVPoll,
        reason: str | None,
        from_other_rank: bool,
    ) -> None:
        bound = self._get(role, rank)
        if status == KVPoll.Success:
            bound.success.inc()
            return
        bound.failed.inc()
        self.failures.labels(*bound.labels, failure_cause(reason, from_other_rank)).inc()

    @hookimpl
    def kvbridge_control_dropped(
        self, role: Role, rank: RankIdentity, count: int, cause: str
    ) -> None:
        self.control_dropped.labels(role.value, rank_label(rank), cause).inc(count)


#: The instance the ``kvbridge.observers`` entry point registers (default registry).
observer = PrometheusObserver()


def serve(port: int, addr: str = "127.0.0.1", multiprocess_dir: str | None = None) -> Any:
    """Serve ``/metrics`` on ``addr:port`` from a thread; returns the server (``.shutdown()``).

    ``multiprocess_dir``: aggregate every process that wrote there (their
    ``PROMETHEUS_MULTIPROC_DIR``) instead of this process's default registry.
    """
    registry: Any = prom.REGISTRY
    if multiprocess_dir is not None:
        from prometheus_client import multiprocess

        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
    server, _thread = prom.start_http_server(port, addr, registry)
    log.info("kvbridge metrics on http://%s:%d/metrics", addr, port)
    return server
