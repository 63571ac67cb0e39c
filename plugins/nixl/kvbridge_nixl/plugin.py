"""The NIXL transport's hooks: the kit's delegation to :class:`NixlManager`.

NIXL is imported only when a manager is created. Whether it is installed is decided when the
plugin loads, without importing it (:mod:`kvbridge.native`), so ``kvbridge transports`` lists
nixl as NOT LOADED, with the install command, where it is missing.
"""

from __future__ import annotations

from typing import Any

from kvbridge.native import check_native, python_module, shared_library
from kvbridge.transport.kit import ManagerHooks
from kvbridge_nixl.manager import NIXL_MODULES

#: The kvbridge plugin API this plugin was written for (not the running core's version).
API_VERSION = "1.1"

check_native(
    "nixl",
    python_module(
        *NIXL_MODULES, fix='pip install "kvbridge-nixl[cpu]"  (CUDA hosts: "kvbridge-nixl[gpu]")'
    ),
    # UCX loads libibverbs even for TCP.
    shared_library("ibverbs", fix="apt-get install --no-install-recommends libibverbs1"),
)


def _create(*args: Any) -> Any:
    from kvbridge_nixl.manager import NixlManager  # imports nixl lazily

    return NixlManager(*args)


plugin = ManagerHooks(
    "nixl",
    _create,
    api_version=API_VERSION,
    capabilities=("cross_process", "one_sided_writes", "rejects_unregistered_memory"),
    description="NVIDIA NIXL agent (UCX backend by default)",
)
