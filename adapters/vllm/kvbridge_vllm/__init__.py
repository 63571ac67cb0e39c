"""kvbridge connector for vLLM: every kvbridge transport, selected by config.

    --kv-transfer-config '{"kv_connector": "KvbridgeConnector",
                           "kv_connector_module_path": "kvbridge_vllm",
                           "kv_role": "kv_producer",
                           "kv_connector_extra_config": {"kvbridge": {"transport": "nixl"}}}'

``KvbridgeConnector`` is thin: it checks the vLLM version and settings, then forwards
scheduler hooks to :mod:`kvbridge_vllm.scheduler` and worker hooks to
:mod:`kvbridge_vllm.worker`. Importing this package does not import vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["KvbridgeConnector"]

if TYPE_CHECKING:
    from kvbridge_vllm.connector import KvbridgeConnector


def __getattr__(name: str) -> Any:
    # vLLM imports the module and takes the attribute: load the vLLM-facing class lazily so the
    # rest of the package (rooms, config) works without vLLM installed.
    if name == "KvbridgeConnector":
        from kvbridge_vllm.connector import KvbridgeConnector

        return KvbridgeConnector
    raise AttributeError(name)
