"""Which ``mori.io`` implementation the plugin talks to, imported when a manager is created."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

ENV_MODULE = "KVBRIDGE_MORI_IO_MODULE"
DEFAULT_MODULE = "mori.io"


def load_io_module(name: str | None = None) -> ModuleType:
    """Import the mori.io API (default: the module named by ``KVBRIDGE_MORI_IO_MODULE``).

    Raises ImportError with the reason (the manager's creation then fails with it).
    """
    name = name or os.environ.get(ENV_MODULE, DEFAULT_MODULE)
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        raise ImportError(
            f"{name} is not importable ({type(exc).__name__}: {exc}); kvbridge-mori needs AMD "
            f"Mori (pip install amd-mori) with the ROCm runtime and RDMA libraries"
        ) from None
    missing = [
        n
        for n in (
            "IOEngine",
            "IOEngineConfig",
            "BackendType",
            "EngineDesc",
            "MemoryDesc",
            "MemoryLocationType",
            "StatusCode",
        )
        if not hasattr(module, n)
    ]
    if missing:
        raise ImportError(f"{name} lacks the mori.io API ({', '.join(missing)})")
    return module
