"""The thread that steps one rank's kvbridge node between SGLang's scheduler steps.

SGLang calls ``poll()`` per request from its scheduler thread and must never block there, and
transfers, heartbeats and aborts have to progress while the scheduler runs a forward pass. So
each rank's node is owned by one driver thread: SGLang's calls only queue work for it (under a
lock, never waiting on I/O) and read what it published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kvbridge_sglang")


class Driver:
    """Calls ``step()`` every ``interval`` while it reports work, else every 5 ms."""

    def __init__(self, name: str, step: Callable[[], bool], interval: float) -> None:
        self._step = step
        self._interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New work was queued: step soon instead of after the idle wait."""
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self._step()
                self._wake.wait(self._interval if busy else 0.005)
                self._wake.clear()
        except BaseException as exc:  # surfaced through every poll() as a failure
            log.exception("kvbridge-sglang driver thread failed")
            self.error = exc

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            deadline = time.monotonic() + timeout
            self._thread.join(max(0.0, deadline - time.monotonic()))


class DrivenEndpoint:
    """What both sides' endpoints share: the node, the work inbox and the driver thread.

    Subclasses build ``self.node`` and their state, then call ``super().__init__`` (which
    starts the driver), and implement :meth:`_step` (driver thread: perform ``_take()``'s
    work, step the node, publish what it decided; return whether rooms are live).
    """

    node: Any

    def __init__(self, name: str, interval: float) -> None:
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, Any]] = []
        self.driver = Driver(name, self._step, interval)

    def _queue(self, kind: str, item: Any) -> None:
        """Scheduler thread: hand work to the driver (never waits on I/O)."""
        with self._lock:
            self._inbox.append((kind, item))
        self.driver.wake()

    def _take(self) -> list[tuple[str, Any]]:
        with self._lock:
            work, self._inbox = self._inbox, []
        return work

    def _step(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        self.driver.close()
        self.node.close()
