"""Transfer figures through vLLM's connector stats hooks (shown in vLLM's periodic log)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats as _Base
except ImportError:  # pragma: no cover
    _Base = object  # type: ignore[assignment,misc]

FIELDS = ("transfers", "bytes", "seconds", "failures")


@dataclass
class KvbridgeStats(_Base):  # type: ignore[misc]
    """``data``: sums over the interval of ``transfers`` (rooms committed on decode, finished
    on prefill), ``bytes`` (KV bytes moved), ``seconds`` (per-room handoff time: decode from
    add to commit, prefill from send to finished) and ``failures``."""

    def __post_init__(self) -> None:
        if not getattr(self, "data", None):
            self.data: dict[str, Any] = {k: 0.0 for k in FIELDS}

    def reset(self) -> None:
        self.data = {k: 0.0 for k in FIELDS}

    def aggregate(self, other: Any) -> KvbridgeStats:
        for k in FIELDS:
            self.data[k] = self.data.get(k, 0.0) + other.data.get(k, 0.0)
        return self

    def reduce(self) -> dict[str, int | float]:
        n = self.data.get("transfers", 0.0)
        secs = self.data.get("seconds", 0.0)
        return {
            "Transfers": int(n),
            "Failures": int(self.data.get("failures", 0.0)),
            "MB moved": round(self.data.get("bytes", 0.0) / 1e6, 3),
            "Avg handoff (ms)": round(1000 * secs / n, 3) if n else 0.0,
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in FIELDS)
