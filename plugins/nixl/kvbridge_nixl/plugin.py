"""The NIXL transport's hooks: the kit's delegation to :class:`NixlManager`."""

from __future__ import annotations

from typing import Any

from kvbridge.transport_kit import ManagerHooks


def _create(*args: Any) -> Any:
    from kvbridge_nixl.manager import NixlManager  # imports nixl lazily

    return NixlManager(*args)


plugin = ManagerHooks(
    "nixl",
    _create,
    capabilities=("cross_process", "rejects_unregistered_memory"),
    description="NVIDIA NIXL agent (UCX backend by default)",
)
