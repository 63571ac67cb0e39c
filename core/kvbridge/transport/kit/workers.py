"""Worker threads per peer, so ``send`` never blocks the scheduler: one running blocking
native calls in submission order, or one keeping several rooms' writes in flight."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("kvbridge")


class PeerWorkers:
    """One daemon thread per peer key; jobs for one key run in submission order.

    :meth:`close` drops the jobs that have not started and waits only for the ones running:
    a closing manager must not first perform its whole backlog (each write to a peer that no
    longer reads may block for the transport's I/O timeout).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        #: Per key: what :meth:`_run` takes (a job, or None: stop).
        self._queues: dict[str, queue.SimpleQueue[Any]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: Set by :meth:`close`; jobs may wait on it instead of sleeping.
        self.closing = threading.Event()

    def submit(self, key: str, job: Callable[[], None]) -> None:
        self._put(key, job)

    def _put(self, key: str, item: object) -> None:
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
        q.put(item)

    def _run(self, q: queue.SimpleQueue[Any]) -> None:
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


#: A pipelined worker with writes in flight waits for the next submission at most this long
#: before it checks them again, backing off from the first to the last (as a blocking write's
#: own polling would: a tight loop would hold the GIL against the engine's threads).
CHECK_FIRST = 20e-6
CHECK_MAX = 1e-3

#: A pipelined job: a generator that starts its writes and yields while they are in flight,
#: True right after it started one, False when it only waited.
Steps = Iterator[bool]


class PipelinedPeerWorkers(PeerWorkers):
    """One thread per peer that keeps up to ``window`` rooms' writes in flight at once.

    For transports whose library can start a write and be asked later whether it landed
    (:meth:`BookedManager.start_write`): one thread then checks every write in flight to a
    peer in one pass, instead of one blocking write after another, each waited for alone.
    Jobs are generators (:data:`Steps`); a room's jobs still run one after another in
    submission order (its aux row after all of its pages), other rooms' jobs pass them.
    :meth:`close` drops the jobs that have not started and lets the ones in flight end.
    """

    def __init__(self, name: str, window: int) -> None:
        super().__init__(name)
        if window < 1:
            raise ValueError(f"a pipeline needs a window of at least 1 write, got {window}")
        self.window = window

    def submit(self, key: str, job: Callable[[], None]) -> None:
        raise TypeError("a pipelined worker runs generator jobs: use submit_steps")

    def submit_steps(self, key: str, room: int, job: Callable[[], Steps]) -> None:
        """Queue ``job`` for ``key``'s thread; it starts once ``room`` has no job running."""
        self._put(key, _Pending(room, job))

    def _run(self, q: queue.SimpleQueue[Any]) -> None:
        running: dict[int, Steps] = {}
        waiting: collections.deque[_Pending] = collections.deque()
        pause, stopping = CHECK_FIRST, False
        while True:
            try:  # block while nothing is in flight, else wait at most ``pause``
                item = q.get(timeout=pause) if running or waiting else q.get()
            except queue.Empty:
                item = _NOTHING
            while item is not _NOTHING:
                if item is None:
                    stopping = True
                    break
                waiting.append(item)
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    item = _NOTHING
            if stopping or self.closing.is_set():
                stopping = True
                waiting.clear()  # never started: dropped, as a blocking worker drops them
                if not running:
                    return
            moved = False
            if waiting and len(running) < self.window:
                held: collections.deque[_Pending] = collections.deque()
                for pending in waiting:
                    if pending.room in running or len(running) >= self.window:
                        held.append(pending)
                    else:
                        running[pending.room] = pending.start()
                waiting = held
            for room, steps in list(running.items()):
                try:
                    moved = next(steps) or moved
                except StopIteration:
                    del running[room]
                    moved = True
                except Exception:  # a job's own bug must not end the peer's other writes
                    log.exception("%s: a write job of room %d raised", self.name, room)
                    del running[room]
            if stopping and not running:
                return
            pause = CHECK_FIRST if moved else min(pause * 2, CHECK_MAX)


class _Pending:
    """A submitted job that has not started: its room and how to start it."""

    __slots__ = ("room", "start")

    def __init__(self, room: int, start: Callable[[], Steps]) -> None:
        self.room = room
        self.start = start


_NOTHING: Any = object()
