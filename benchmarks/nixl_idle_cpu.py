"""CPU an idle NIXL manager costs, per thread, for each ``progress_thread`` setting (Linux only).

One decode-side manager is created through the plugin loading path an engine uses, left idle
for ``--seconds``, and every thread it started is read from ``/proc/self/task/*/schedstat``
(native threads too, see :mod:`thread_cpu`). The settings alternate, ``--rounds`` times, so a
shared machine's load changes hit both alike.

Usage: python benchmarks/nixl_idle_cpu.py [--seconds 3] [--rounds 3]
Prints a Markdown table (nothing is written).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import thread_cpu


def idle(progress_thread: bool, seconds: float) -> dict[str, float]:
    """Percent of one core per group of the threads the manager started, while idle."""
    from kvbridge.config import TransferConfig
    from kvbridge.testing.rig import require_transport
    from kvbridge.transport.facade import Transport
    from kvbridge.types import MemoryRegion, RankIdentity, Role

    kv, aux = np.zeros(1 << 20, dtype=np.uint8), np.zeros(1024, dtype=np.uint8)
    before = set(thread_cpu.snapshot())
    manager = Transport(require_transport("nixl")).create_manager(
        TransferConfig(transport="nixl", transport_options={"progress_thread": progress_thread}),
        RankIdentity(Role.DECODE),
        (MemoryRegion.of(kv, 65536),),
        (MemoryRegion.of(aux, 64),),
    )
    try:
        time.sleep(0.5)  # let the agent's threads start
        start = thread_cpu.snapshot()
        time.sleep(seconds)
        end = thread_cpu.snapshot()
    finally:
        manager.close()
    out: dict[str, float] = {}
    for tid, (name, ns) in end.items():
        if tid in before or tid not in start:
            continue
        name = "kvbridge-nixl-progress" if name.startswith("kvbridge-nixl-progress") else name
        out[name] = out.get(name, 0.0) + (ns - start[tid][1]) / seconds / 1e9 * 100
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    os.environ.setdefault("UCX_MODULES", "^ib")
    print("| round | progress_thread | load (1 min) | threads started: % of a core, idle | total |")
    print("|---:|---|---:|---|---:|")
    for r in range(1, args.rounds + 1):
        for setting in (False, True):
            load = os.getloadavg()[0]
            cpu = idle(setting, args.seconds)
            # NIXL's progress thread has no name of its own: it is one of the native "python"
            # threads (the process's comm); UCX's async thread is "async".
            threads = ", ".join(f"{n.removeprefix('native:')} {v:.1f}" for n, v in cpu.items())
            print(
                f"| {r} | {str(setting).lower()} | {load:.2f} | {threads} "
                f"| **{sum(cpu.values()):.1f}** |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
