"""The Mooncake transport's hooks: the kit's delegation to :class:`MooncakeManager`.

The engine is imported only when a manager is created. Whether it is installed is decided
when the plugin loads, without importing it (:mod:`kvbridge.native`), so ``kvbridge
transports`` lists mooncake as NOT LOADED, with the install command, where it is missing.
"""

from __future__ import annotations

from typing import Any

from kvbridge.native import check_native, python_module, shared_library
from kvbridge.transport.kit import ManagerHooks

#: The kvbridge plugin API this plugin was written for (not the running core's version).
API_VERSION = "1.1"

check_native(
    "mooncake",
    python_module(
        "mooncake",
        fix='pip install "kvbridge-mooncake[cpu]"  (CUDA hosts: "kvbridge-mooncake[gpu]")',
    ),
    # The engine links libibverbs even for TCP.
    shared_library("ibverbs", fix="apt-get install --no-install-recommends libibverbs1"),
)


def _create(*args: Any) -> Any:
    from kvbridge_mooncake.manager import MooncakeManager  # imports mooncake lazily

    return MooncakeManager(*args)


plugin = ManagerHooks(
    "mooncake",
    _create,
    api_version=API_VERSION,
    capabilities=("cross_process", "one_sided_writes", "rejects_unregistered_memory"),
    description="Mooncake transfer engine (TCP here; RDMA on clusters)",
)
