"""The Mori transport's hooks: the kit's delegation to :class:`MoriManager`.

mori.io is resolved when this module loads: where it is not importable the plugin fails to
load with the reason, which ``kvbridge transports`` shows (see :mod:`kvbridge_mori.io_module`).
"""

from __future__ import annotations

from typing import Any

from kvbridge.transport_kit import ManagerHooks
from kvbridge_mori.io_module import load_io_module
from kvbridge_mori.manager import MoriManager

IO = load_io_module()


def _create(*args: Any) -> MoriManager:
    return MoriManager(IO, *args)


plugin = ManagerHooks(
    "mori",
    _create,
    capabilities=("cross_process", "rejects_unregistered_memory"),
    description=f"AMD Mori IOEngine via {IO.__name__}",
)
