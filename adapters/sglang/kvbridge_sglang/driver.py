"""Who steps one rank's kvbridge node: SGLang's own ``poll()`` calls, and a driver thread.

SGLang calls ``poll()`` per request from its scheduler thread and must never block there, and
transfers, heartbeats and aborts have to progress while the scheduler runs a forward pass.
SGLang's calls queue work (under a lock, never waiting on I/O) and read what a step published.

While SGLang waits for a transfer its scheduler loop polls without pause, so a step left to
another thread first has to win the GIL from that loop (up to the interpreter's 5 ms switch
interval, several times per request). So a ``poll()`` steps the node itself when no step ran
for ``poll_interval`` (never blocking: if the driver thread is stepping, that step does the
work), and the driver thread steps only when no ``poll()`` did for ``poll_interval``: between
SGLang's steps and during its forward passes. A step on SGLang's thread is safe because
kvbridge-sglang's nodes have no collective of their own (SGLang does the MIN over its TP ranks):
a step never waits for another rank.
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
    """What both sides' endpoints share: the node, the work inbox, and its two steppers.

    Subclasses build ``self.node`` and their state, then call ``super().__init__`` (which
    starts the driver), and implement :meth:`_step` (perform ``_take()``'s work, step the
    node, publish what it decided; return whether rooms are live). Their ``poll()`` calls
    :meth:`step_from_poll` first.
    """

    node: Any

    def __init__(self, name: str, interval: float) -> None:
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, Any]] = []
        self._interval = interval
        #: Held for a whole step: the node is stepped by one thread at a time.
        self._stepping = threading.Lock()
        self._last_step = 0.0
        self._busy = False
        #: Steps taken in SGLang's ``poll()`` and by the driver thread.
        self.poll_steps = 0
        self.driver_steps = 0
        self.driver = Driver(name, self._driver_step, interval)

    def _queue(self, kind: str, item: Any) -> None:
        """Scheduler thread: hand work to the next step (never waits on I/O)."""
        with self._lock:
            self._inbox.append((kind, item))
        self.driver.wake()

    def _take(self) -> list[tuple[str, Any]]:
        with self._lock:
            work, self._inbox = self._inbox, []
        return work

    def step_from_poll(self) -> None:
        """SGLang's scheduler thread: step here unless a step ran within ``poll_interval`` or
        one is running now. A failure is kept for every later ``poll()`` to report, as one
        in the driver thread is."""
        if self.driver.error is not None or time.monotonic() - self._last_step < self._interval:
            return
        if not self._stepping.acquire(blocking=False):
            return
        try:
            self._step_locked()
            self.poll_steps += 1
        except Exception as exc:
            log.exception("kvbridge-sglang step failed")
            self.driver.error = exc
        finally:
            self._stepping.release()

    def _driver_step(self) -> bool:
        if self._busy and time.monotonic() - self._last_step < self._interval:
            return True  # a poll() stepped the node just now
        with self._stepping:
            self._step_locked()
            self.driver_steps += 1
        return self._busy

    def _step_locked(self) -> None:
        self._busy = self._step()
        self._last_step = time.monotonic()

    def _step(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        self.driver.close()
        self.node.close()
