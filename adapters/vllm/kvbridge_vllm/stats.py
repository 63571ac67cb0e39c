"""Transfer figures through vLLM's connector stats hooks: vLLM's periodic log and Prometheus.

Path of the figures in vLLM 0.32: each worker's ``get_kv_connector_stats`` returns a
:class:`KvbridgeStats` per engine step (pickled to the scheduler process); vLLM aggregates
the workers' objects, ships ``data`` to the API server in its scheduler stats (msgpack), where
``KvbridgeConnector.build_kv_connector_stats`` rebuilds one per step for the log line
(:meth:`KvbridgeStats.reduce`, once per log interval) and :class:`KvbridgePromMetrics`
(``KvbridgeConnector.build_prom_metrics``) records the same ``data`` into Prometheus.
``data`` therefore holds plain floats and one list of floats only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics as _PromBase,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats as _Base
except ImportError:  # pragma: no cover
    _Base = object  # type: ignore[assignment,misc]
    _PromBase = object  # type: ignore[assignment,misc]

#: Sums over the interval.
FIELDS = ("transfers", "bytes", "seconds", "failures")
#: One handoff duration (seconds) per transfer, in the order they ended.
HANDOFFS = "handoff_seconds"


def count(data: dict[str, Any], **values: float) -> None:
    """Add one event to a worker's interval ``data``: every value is summed under its name, and
    a ``seconds`` (one finished transfer's handoff time) is also kept in :data:`HANDOFFS`."""
    for k, v in values.items():
        data[k] = data.get(k, 0.0) + v
    if "seconds" in values:
        data.setdefault(HANDOFFS, []).append(float(values["seconds"]))


@dataclass
class KvbridgeStats(_Base):  # type: ignore[misc]
    """``data``: sums over the interval of ``transfers`` (rooms committed on decode, finished
    on prefill), ``bytes`` (KV bytes moved), ``seconds`` (per-room handoff time: decode from
    add to commit, prefill from send to finished) and ``failures``; plus ``handoff_seconds``,
    each transfer's handoff time (the histogram). One entry per worker (TP rank) and room:
    vLLM aggregates the workers' stats of a step, and a room may end on two ranks in
    different steps, so the ranks' entries are kept apart (not merged per request)."""

    def __post_init__(self) -> None:
        if not getattr(self, "data", None):
            self.reset()

    def reset(self) -> None:
        self.data: dict[str, Any] = {k: 0.0 for k in FIELDS}
        self.data[HANDOFFS] = []

    @property
    def handoffs(self) -> list[float]:
        return list(self.data.get(HANDOFFS) or ())

    def aggregate(self, other: Any) -> KvbridgeStats:
        # New containers only: vLLM hands the same ``data`` to the log accumulator and to
        # Prometheus, so neither may see the other's additions.
        theirs = other.data
        merged: dict[str, Any] = {k: self.data.get(k, 0.0) + theirs.get(k, 0.0) for k in FIELDS}
        merged[HANDOFFS] = self.handoffs + list(theirs.get(HANDOFFS) or ())
        self.data = merged
        return self

    def reduce(self) -> dict[str, int | float]:
        n = self.data.get("transfers", 0.0)
        secs = self.data.get("seconds", 0.0)
        handoffs = self.handoffs
        return {
            "Transfers": int(n),
            "Failures": int(self.data.get("failures", 0.0)),
            "MB moved": round(self.data.get("bytes", 0.0) / 1e6, 3),
            "Avg handoff (ms)": round(1000 * secs / n, 3) if n else 0.0,
            "P90 handoff (ms)": (
                round(1000 * float(np.percentile(handoffs, 90)), 3) if handoffs else 0.0
            ),
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in FIELDS) and not self.data.get(HANDOFFS)


class KvbridgePromMetrics(_PromBase):  # type: ignore[misc]
    """kvbridge's series on vLLM's ``/metrics`` (labels ``model_name``, ``engine``):

    - ``vllm:kvbridge_handoff_seconds`` (histogram): one observation per transfer and worker;
      on decode from the room's ``add`` to its commit (the KV is in vLLM's blocks), on prefill
      from the ``send`` to the finished notice.
    - ``vllm:kvbridge_transferred_bytes_total``: KV bytes written into (decode) or sent from
      (prefill) this instance's blocks.
    - ``vllm:kvbridge_num_failed_transfers_total``: rooms that failed (aborted, timed out,
      refused by the peer); vLLM then recomputes (decode) or frees the blocks (prefill).
    """

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        from kvbridge.metrics import SECONDS_BUCKETS  # needs prometheus_client, as vLLM does

        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        role = getattr(getattr(vllm_config, "kv_transfer_config", None), "kv_role", None)
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
        self.bytes = self._per_engine(
            self._counter_cls(
                name="vllm:kvbridge_transferred_bytes",
                documentation="KV cache bytes moved by kvbridge (all workers).",
                labelnames=labelnames,
            )
        )
        self.failures = self._per_engine(
            self._counter_cls(
                name="vllm:kvbridge_num_failed_transfers",
                documentation="kvbridge transfers that failed (per worker).",
                labelnames=labelnames,
            )
        )

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        """One labelled child per engine (what vLLM's ``create_metric_per_engine`` does)."""
        return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        handoff = self.handoff[engine_idx]
        for seconds in data.get(HANDOFFS) or ():
            handoff.observe(seconds)
        moved = float(data.get("bytes", 0.0))
        if moved > 0:
            self.bytes[engine_idx].inc(moved)
        failed = float(data.get("failures", 0.0))
        if failed > 0:
            self.failures[engine_idx].inc(failed)
