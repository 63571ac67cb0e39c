"""kvbridge-vllm's settings, from ``--kv-transfer-config``'s ``kv_connector_extra_config``.

``kv_connector_extra_config = {"kvbridge": {...}, "bootstrap_host": ..., "bootstrap_port": ...}``:
``kvbridge`` is exactly what :meth:`kvbridge.TransferConfig.from_dict` takes; the bootstrap
keys say where the prefill instance's bootstrap server listens (decode instances learn the
address from the request's ``kv_transfer_params``).
"""

from __future__ import annotations

from typing import Any

import attrs

from kvbridge import TransferConfig

DEFAULT_BOOTSTRAP_PORT = 8998
_KEYS = {
    "kvbridge",
    "bootstrap_host",
    "bootstrap_port",
    "poll_interval",
    "aux_slots",
    "metric_names",
}
#: ``metric_names``: the prefix of the connector's Prometheus series. ``nixl`` emits exactly
#: the ``vllm:nixl_*`` names NixlConnector uses, so dashboards and alerts built on it keep
#: working unchanged (kvbridge_vllm.stats says which series have a counterpart).
METRIC_NAMES = ("kvbridge", "nixl")


def metric_names_of(extra: dict[str, Any] | None) -> str:
    """The ``metric_names`` setting of ``kv_connector_extra_config`` (default ``kvbridge``)."""
    value = (extra or {}).get("metric_names", METRIC_NAMES[0])
    if not isinstance(value, str) or value not in METRIC_NAMES:
        raise ValueError(
            f"kv_connector_extra_config metric_names must be one of "
            f"{', '.join(repr(n) for n in METRIC_NAMES)}, got {value!r}"
        )
    return value


@attrs.frozen
class ConnectorConfig:
    transfer: TransferConfig
    bootstrap_host: str = "127.0.0.1"
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    #: Longest the node goes unstepped while rooms are live: vLLM's hooks step it every engine
    #: step, and the driver thread when no hook did for this long.
    poll_interval: float = 0.001
    #: Prefill aux rows (one per room being sent, room stamp last).
    aux_slots: int = 1024
    #: Prometheus series names: ``kvbridge`` (``vllm:kvbridge_*``) or ``nixl`` (``vllm:nixl_*``).
    metric_names: str = METRIC_NAMES[0]

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        unknown = set(extra) - _KEYS
        if unknown:
            raise ValueError(
                f"unknown keys in kv_connector_extra_config: {sorted(unknown)}; expected "
                f'{sorted(_KEYS)} (transport settings go inside "kvbridge")'
            )
        transfer = TransferConfig.from_dict(extra.get("kvbridge") or {})
        port = int(extra.get("bootstrap_port", DEFAULT_BOOTSTRAP_PORT))
        if not 0 < port < 65536:
            raise ValueError(f"bootstrap_port must be 1..65535, got {port}")
        poll_interval = float(extra.get("poll_interval", 0.001))
        if not 0 < poll_interval <= 3600:  # also refuses NaN
            raise ValueError(f"poll_interval must be in (0, 3600] seconds, got {poll_interval}")
        return cls(
            transfer=transfer,
            bootstrap_host=str(extra.get("bootstrap_host", transfer.bind_host)),
            bootstrap_port=port,
            poll_interval=poll_interval,
            aux_slots=int(extra.get("aux_slots", 1024)),
            metric_names=metric_names_of(extra),
        )

    @property
    def bootstrap_addr(self) -> str:
        """``host:port`` that decode instances reach this prefill's bootstrap server on."""
        host = self.transfer.advertise_host or self.bootstrap_host
        if host == "0.0.0.0":
            raise ValueError(
                "bootstrap_host 0.0.0.0 needs kvbridge.advertise_host naming this machine"
            )
        return f"{host}:{self.bootstrap_port}"


def normalize_addr(addr: str) -> str:
    """Accept ``http://host:port`` (vLLM's MooncakeConnector style) as well as ``host:port``."""
    for prefix in ("http://", "https://"):
        if addr.startswith(prefix):
            addr = addr[len(prefix) :]
    return addr.rstrip("/")
