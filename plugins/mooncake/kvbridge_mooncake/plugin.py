"""The Mooncake transport's hooks: the kit's delegation to :class:`MooncakeManager`."""

from __future__ import annotations

from typing import Any

from kvbridge.transport_kit import ManagerHooks


def _create(*args: Any) -> Any:
    from kvbridge_mooncake.manager import MooncakeManager  # imports mooncake lazily

    return MooncakeManager(*args)


plugin = ManagerHooks(
    "mooncake",
    _create,
    capabilities=("cross_process", "rejects_unregistered_memory"),
    description="Mooncake transfer engine (TCP here; RDMA on clusters)",
)
