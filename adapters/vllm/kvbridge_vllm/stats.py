"""Transfer figures through vLLM's connector stats hooks: vLLM's periodic log and Prometheus.

Path of the figures in vLLM 0.32: each worker's ``get_kv_connector_stats`` returns a
:class:`KvbridgeStats` per engine step (pickled to the scheduler process); vLLM aggregates
the workers' objects, ships ``data`` to the API server in its scheduler stats (msgpack), where
``KvbridgeConnector.build_kv_connector_stats`` rebuilds one per step for the log line
(:meth:`KvbridgeStats.reduce`, once per log interval) and :class:`KvbridgePromMetrics`
(``KvbridgeConnector.build_prom_metrics``) records the same ``data`` into Prometheus.
``data`` therefore holds plain floats and lists of floats only.

The series mirror NixlConnector's ``vllm:nixl_*`` set (same types, buckets and labels), so a
dashboard needs only the prefix changed, or nothing with ``metric_names = "nixl"``. kvbridge
pushes (prefill writes into decode's blocks), so the per-transfer figures are recorded where
NixlPushConnector records them: on the instance that posts the writes (prefill).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbridge import Role, hookimpl
from kvbridge_vllm.config import metric_names_of

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics as _PromBase,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats as _Base
except ImportError:  # pragma: no cover
    _Base = object  # type: ignore[assignment,misc]
    _PromBase = object  # type: ignore[assignment,misc]

#: Sums over the interval: ``transfers`` (rooms committed on decode, finished on prefill),
#: ``bytes`` (KV bytes written into / sent from this instance's blocks), ``seconds`` (sum of
#: the handoff times), ``failures`` (rooms that failed: transport, peer, timeouts other than
#: expiry), ``failed_notifications`` (control frames the node could not send), ``expired``
#: (prefill rooms whose decode never came) and ``cancelled`` (rooms ended because vLLM ended
#: the request, on either side).
SUMS = (
    "transfers",
    "bytes",
    "seconds",
    "failures",
    "failed_notifications",
    "expired",
    "cancelled",
)
#: One handoff duration (seconds) per transfer, in the order they ended (both sides).
HANDOFFS = "handoff_seconds"
#: One value per event (histograms and percentiles). Prefill only: ``xfer_seconds`` and
#: ``xfer_bytes`` per finished transfer (the node's own figures: first send to finished, and
#: the bytes of every descriptor it wrote, KV and aux row), ``post_seconds`` per ``send``
#: (building the descriptors and handing them to the transport, which returns without
#: waiting for the writes).
LISTS = (HANDOFFS, "xfer_seconds", "post_seconds", "xfer_bytes")
_SUMS = frozenset(SUMS)
_LISTS = frozenset(LISTS)

#: How kvbridge's prefill queue words a room whose decode never sent its metadata within
#: ``bootstrap_timeout``: the prefill held the blocks for nothing and freed them, which is what
#: NixlConnector counts as an expired KV lease (``vllm:nixl_num_kv_expired_reqs``).
EXPIRED_REASON = "decode never sent metadata within bootstrap_timeout"

# Buckets of NixlConnector's histograms in vLLM 0.32 (nixl/stats.py), so that quantiles and
# ``le`` filters mean the same on both connectors.
XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
POST_TIME_BUCKETS = (0.001, *XFER_TIME_BUCKETS)
BYTES_BUCKETS = tuple(float(2 ** (10 + i)) for i in range(1, 25, 2))  # 2 KiB .. 8 GiB, x4
_MIB = float(2**20)  # NixlConnector's "MB" in the log line


def count(data: dict[str, Any], **values: float) -> None:
    """Add one event to a worker's interval ``data``: a name of :data:`SUMS` is summed, a name
    of :data:`LISTS` appended; a ``seconds`` (one finished transfer's handoff time) is also
    kept in :data:`HANDOFFS`."""
    for name, value in values.items():
        if name in _SUMS:
            data[name] = data.get(name, 0.0) + value
        elif name in _LISTS:
            data.setdefault(name, []).append(float(value))
        else:
            raise ValueError(f"unknown kvbridge-vllm figure {name!r}")
    if "seconds" in values:
        data.setdefault(HANDOFFS, []).append(float(values["seconds"]))


def abort_kind(reason: str, cancel_reasons: Sequence[str]) -> str:
    """Which :data:`SUMS` figure an aborted room counts in: ``expired`` (its decode never
    came), ``cancelled`` (vLLM ended the request here or on the peer: one of
    ``cancel_reasons`` is in the reason, which the peer's node forwards), else ``failures``."""
    if reason.startswith(EXPIRED_REASON):
        return "expired"
    if any(cause in reason for cause in cancel_reasons):
        return "cancelled"
    return "failures"


class NodeFigures:
    """A kvbridge observer (:class:`kvbridge.hookspecs.ObserverSpec`) for one worker's node:
    the figures only the node knows, handed to ``record`` (``count``'s keywords) on the
    driver thread that steps the node."""

    def __init__(self, record: Callable[..., None]) -> None:
        self.record = record

    @hookimpl
    def kvbridge_transfer_finished(self, role: Role, nbytes: int, seconds: float) -> None:
        if role == Role.PREFILL:  # the writer, where NixlPushConnector records its transfers
            self.record(xfer_seconds=seconds, xfer_bytes=nbytes)

    @hookimpl
    def kvbridge_control_dropped(self, count: int, cause: str) -> None:
        # NixlConnector counts a notification it could not send; kvbridge's counterpart is a
        # control frame (metadata, status, abort, ack) that the channel refused to queue.
        if cause == "send_failed":
            self.record(failed_notifications=count)


def _values(data: dict[str, Any], name: str) -> list[float]:
    return list(data.get(name) or ())


def _ms(values: list[float], percentile: float | None = None) -> float:
    """Milliseconds, rounded as the log line shows them: the mean, or that percentile."""
    if not values:
        return 0.0
    value = np.mean(values) if percentile is None else np.percentile(values, percentile)
    return round(1000 * float(value), 3)


@dataclass
class KvbridgeStats(_Base):  # type: ignore[misc]
    """``data``: the :data:`SUMS` and :data:`LISTS` of an interval. One entry per worker (TP
    rank) and room: vLLM aggregates the workers' stats of a step, and a room may end on two
    ranks in different steps, so the ranks' entries are kept apart (not merged per request)."""

    def __post_init__(self) -> None:
        if not getattr(self, "data", None):
            self.reset()

    def reset(self) -> None:
        self.data: dict[str, Any] = {k: 0.0 for k in SUMS}
        for k in LISTS:
            self.data[k] = []

    @property
    def handoffs(self) -> list[float]:
        return _values(self.data, HANDOFFS)

    def aggregate(self, other: Any) -> KvbridgeStats:
        # New containers only: vLLM hands the same ``data`` to the log accumulator and to
        # Prometheus, so neither may see the other's additions.
        theirs = other.data
        merged: dict[str, Any] = {k: self.data.get(k, 0.0) + theirs.get(k, 0.0) for k in SUMS}
        for k in LISTS:
            merged[k] = _values(self.data, k) + _values(theirs, k)
        self.data = merged
        return self

    def reduce(self) -> dict[str, int | float]:
        """The log line: NixlConnector's keys where kvbridge has the figure (its "MB" is MiB),
        then kvbridge's own."""
        data = self.data
        n = data.get("transfers", 0.0)
        xfer = _values(data, "xfer_seconds")
        xfer_mib = sum(_values(data, "xfer_bytes")) / _MIB
        return {
            "Num successful transfers": int(n),
            "Avg xfer time (ms)": _ms(xfer),
            "P90 xfer time (ms)": _ms(xfer, 90),
            "Avg post time (ms)": _ms(_values(data, "post_seconds")),
            "P90 post time (ms)": _ms(_values(data, "post_seconds"), 90),
            "Avg MB per transfer": round(xfer_mib / len(xfer), 3) if xfer else 0.0,
            "Throughput (MB/s)": round(xfer_mib / sum(xfer), 3) if sum(xfer) > 0 else 0.0,
            "Num failed transfers": int(
                data.get("failures", 0.0) + data.get("failed_notifications", 0.0)
            ),
            "Num KV expired reqs": int(data.get("expired", 0.0)),
            "Num cancelled": int(data.get("cancelled", 0.0)),
            "MB moved": round(data.get("bytes", 0.0) / _MIB, 3),
            "Avg handoff (ms)": _ms(self.handoffs),
            "P90 handoff (ms)": _ms(self.handoffs, 90),
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in SUMS) and not any(self.data.get(k) for k in LISTS)


@dataclass(frozen=True)
class Series:
    """One Prometheus series: its name under each ``metric_names`` setting (None: no such
    series under that setting), and the ``data`` it is recorded from."""

    kvbridge: str
    nixl: str | None
    source: tuple[str, ...]
    buckets: tuple[float, ...] | None = None  # a histogram; None: a counter
    documentation: str = ""

    def name(self, metric_names: str) -> str:
        return self.nixl if metric_names == "nixl" and self.nixl else self.kvbridge


#: Every series, with its ``vllm:nixl_*`` counterpart. NixlConnector's
#: ``vllm:nixl_num_descriptors`` and ``vllm:nixl_num_notifications_after_expiry`` have none
#: (see the adapter README, Metrics).
SERIES = (
    Series(
        "vllm:kvbridge_xfer_time_seconds",
        "vllm:nixl_xfer_time_seconds",
        ("xfer_seconds",),
        XFER_TIME_BUCKETS,
        "KV transfer time per transfer and worker, on prefill (the writer): from the first "
        "send to the step that found every write landed.",
    ),
    Series(
        "vllm:kvbridge_post_time_seconds",
        "vllm:nixl_post_time_seconds",
        ("post_seconds",),
        POST_TIME_BUCKETS,
        "Time to post a transfer's writes, on prefill: building the descriptors and the "
        "transport's send call (which does not wait for the writes).",
    ),
    Series(
        "vllm:kvbridge_bytes_transferred",
        "vllm:nixl_bytes_transferred",
        ("xfer_bytes",),
        BYTES_BUCKETS,
        "Bytes written per transfer and worker, on prefill (every descriptor: KV and aux row).",
    ),
    Series(
        "vllm:kvbridge_num_failed_transfers",
        "vllm:nixl_num_failed_transfers",
        ("failures", "failed_notifications"),
        documentation="Failed kvbridge transfers per worker (transport, peer, timeouts), "
        "including notification failures. Expired and cancelled rooms are counted apart.",
    ),
    Series(
        "vllm:kvbridge_num_failed_notifications",
        "vllm:nixl_num_failed_notifications",
        ("failed_notifications",),
        documentation="kvbridge control frames (metadata, status, abort, ack) the node could "
        "not send; also counted in num_failed_transfers.",
    ),
    Series(
        "vllm:kvbridge_num_kv_expired_reqs",
        "vllm:nixl_num_kv_expired_reqs",
        ("expired",),
        documentation="Requests whose KV the prefill held until bootstrap_timeout without "
        "their decode asking for it, then freed. Tracked on the prefill instance.",
    ),
    Series(
        "vllm:kvbridge_num_cancelled_transfers",
        None,
        ("cancelled",),
        documentation="kvbridge transfers ended because vLLM ended the request (client gone "
        "or aborted) here or on the peer instance.",
    ),
    Series(
        "vllm:kvbridge_transferred_bytes",
        None,
        ("bytes",),
        documentation="KV cache bytes moved by kvbridge (all workers): written into "
        "(decode) or sent from (prefill) this instance's blocks.",
    ),
)


class KvbridgePromMetrics(_PromBase):  # type: ignore[misc]
    """kvbridge's series on vLLM's ``/metrics`` (labels ``model_name``, ``engine``): every
    :data:`SERIES`, named by ``metric_names``, plus ``vllm:kvbridge_handoff_seconds``
    (histogram): one observation per transfer and worker; on decode from the room's ``add``
    to its commit (the KV is in vLLM's blocks), on prefill from the ``send`` to the finished
    notice."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        from kvbridge.metrics import SECONDS_BUCKETS  # needs prometheus_client, as vLLM does

        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        kv = getattr(vllm_config, "kv_transfer_config", None)
        self.metric_names = metric_names_of(getattr(kv, "kv_connector_extra_config", None))
        role = getattr(kv, "kv_role", None)
        side = "decode: add -> commit" if role == "kv_consumer" else "prefill: send -> finished"
        histogram: Any = self._histogram_cls  # vLLM types it as any of its metric classes
        self.handoff = self._per_engine(
            histogram(
                name="vllm:kvbridge_handoff_seconds",
                documentation=f"kvbridge KV handoff time per transfer and worker ({side}).",
                buckets=list(SECONDS_BUCKETS),  # kvbridge's own, 0.5 ms to 5 min
                labelnames=labelnames,
            )
        )
        self.histograms: list[tuple[dict[int, Any], Series]] = []
        self.counters: list[tuple[dict[int, Any], Series]] = []
        for series in SERIES:
            name = series.name(self.metric_names)
            if series.buckets is not None:
                metric = histogram(
                    name=name,
                    documentation=series.documentation,
                    buckets=list(series.buckets),
                    labelnames=labelnames,
                )
                self.histograms.append((self._per_engine(metric), series))
            else:
                metric = self._counter_cls(
                    name=name, documentation=series.documentation, labelnames=labelnames
                )
                self.counters.append((self._per_engine(metric), series))

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        """One labelled child per engine (what vLLM's ``create_metric_per_engine`` does)."""
        return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        handoff = self.handoff[engine_idx]
        for seconds in data.get(HANDOFFS) or ():
            handoff.observe(seconds)
        for children, series in self.histograms:
            child = children[engine_idx]
            for name in series.source:
                for value in data.get(name) or ():
                    child.observe(value)
        for children, series in self.counters:
            total = sum(float(data.get(name, 0.0)) for name in series.source)
            if total > 0:
                children[engine_idx].inc(total)
