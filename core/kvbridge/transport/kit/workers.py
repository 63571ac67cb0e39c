"""One thread per peer running blocking native calls in submission order, so ``send`` never
blocks the scheduler and writes to one peer stay ordered."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable


class PeerWorkers:
    """One daemon thread per peer key; jobs for one key run in submission order.

    :meth:`close` drops the jobs that have not started and waits only for the ones running:
    a closing manager must not first perform its whole backlog (each write to a peer that no
    longer reads may block for the transport's I/O timeout).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queues: dict[str, queue.SimpleQueue[Callable[[], None] | None]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: Set by :meth:`close`; jobs may wait on it instead of sleeping.
        self.closing = threading.Event()

    def submit(self, key: str, job: Callable[[], None]) -> None:
        with self._lock:
            if self.closing.is_set():
                return  # closed: nothing starts any more
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = queue.SimpleQueue()
                t = threading.Thread(
                    target=self._run,
                    args=(q,),
                    daemon=True,
                    name=f"{self.name}-{len(self._threads)}",
                )
                t.start()
                self._threads.append(t)
        q.put(job)

    def _run(self, q: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while True:
            job = q.get()
            if job is None or self.closing.is_set():
                return
            job()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker; waits for the jobs in flight, ``timeout`` seconds in all."""
        with self._lock:
            self.closing.set()
            for q in self._queues.values():
                q.put(None)
            threads, self._threads = self._threads, []
            self._queues.clear()
        deadline = time.monotonic() + timeout
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
