"""The Mori transport's hooks: the kit's delegation to :class:`MoriManager`.

Which mori.io implementation to use (``mori.io``, or the module named by
``KVBRIDGE_MORI_IO_MODULE``) is decided when the plugin loads; whether it is installed is
checked without importing it (:mod:`kvbridge.native`: importing mori loads ROCm and RDMA
libraries), so ``kvbridge transports`` lists mori as NOT LOADED, with the install command,
where it is missing. The module is imported when the first manager is created.
"""

from __future__ import annotations

import os
from typing import Any

from kvbridge.native import check_native, python_module
from kvbridge.transport.kit import ManagerHooks
from kvbridge_mori.io_module import DEFAULT_MODULE, ENV_MODULE, load_io_module

#: The kvbridge plugin API this plugin was written for (not the running core's version).
API_VERSION = "1.1"

IO_MODULE = os.environ.get(ENV_MODULE, DEFAULT_MODULE)

check_native(
    "mori",
    python_module(
        IO_MODULE.split(".")[0],
        fix='pip install "kvbridge-mori[amd]"  (AMD hosts with the ROCm runtime and RDMA '
        "libraries)",
    ),
)


def _create(*args: Any) -> Any:
    from kvbridge_mori.manager import MoriManager

    return MoriManager(load_io_module(IO_MODULE), *args)


plugin = ManagerHooks(
    "mori",
    _create,
    api_version=API_VERSION,
    capabilities=("cross_process", "one_sided_writes", "rejects_unregistered_memory"),
    description=f"AMD Mori IOEngine via {IO_MODULE}",
)
