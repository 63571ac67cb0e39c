"""Telling the operator when a worker's driver thread could not run on time.

Prefill heartbeats come from the driver thread (see :mod:`kvbridge_vllm.worker`): a stall of
it long enough eats into decode's liveness limit. :class:`StallWatch` says when a step came
late, and whether the thread was waiting to run (the process starved of the GIL or the CPU)
or inside the step (a slow transport call). With the ``kvbridge_vllm`` logger at DEBUG it
also says where the process's other threads were and which garbage collections were long.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import traceback

log = logging.getLogger("kvbridge_vllm")
#: One warning per this many seconds at most; the ones held back are counted in the next.
WARN_EVERY = 30.0


class StallWatch:
    def __init__(self, heartbeat_interval: float) -> None:
        self.interval = heartbeat_interval
        self.threshold = heartbeat_interval / 2
        self.stalls = 0
        self._held_back = 0
        self._warned_at = -WARN_EVERY
        self._gc_started = 0.0
        if log.isEnabledFor(logging.DEBUG):
            gc.callbacks.append(self._on_gc)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def step_done(self, last: float, began: float, ended: float) -> None:
        """The previous step ended at ``last``; this one ran from ``began`` to ``ended``."""
        if ended - last <= self.threshold:
            return
        self.stalls += 1
        if ended - self._warned_at < WARN_EVERY:
            self._held_back += 1
            return
        log.warning(
            "kvbridge-vllm driver thread was late: %.2f s since its last step (%.2f s waiting "
            "to run, %.2f s inside the step); heartbeats are sent every %g s%s",
            ended - last,
            began - last,
            ended - began,
            self.interval,
            f" ({self._held_back} more late steps not logged)" if self._held_back else "",
        )
        self._warned_at, self._held_back = ended, 0
        if log.isEnabledFor(logging.DEBUG):
            log.debug("where the other threads are now:\n%s", other_threads())

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
            return
        took = time.monotonic() - self._gc_started
        if took > 0.1:  # a collection holds the GIL throughout
            log.debug(
                "garbage collection of generation %d took %.2f s (%d collected)",
                info.get("generation", -1),
                took,
                info.get("collected", 0),
            )


def other_threads() -> str:
    """The innermost frames of every other thread of this process."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        stack = traceback.extract_stack(frame)[-4:]
        where = " <- ".join(f"{f.name} ({f.filename}:{f.lineno})" for f in reversed(stack))
        out.append(f"  {names.get(ident, ident)}: {where}")
    return "\n".join(out)
