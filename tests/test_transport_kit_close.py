"""Closing a kit-based manager waits only for the writes in flight, never for the backlog.

A prefill process that finished its work could take over 20 s to exit under load: its
``PrefillNode.close()`` spent that time in the transport manager's close, where each peer's
worker ran every queued write before it saw the stop marker (writes to a decode rank that no
longer reads block until the transport's I/O timeout), and the threads were joined one after
another, each with its own timeout.
"""

from __future__ import annotations

import threading
import time

from kvbridge.transport.kit import PeerWorkers

PEERS, QUEUED = ("a", "b", "c"), 100


def test_close_drops_queued_jobs_and_waits_only_for_the_ones_running() -> None:
    workers = PeerWorkers("test")
    gate = threading.Event()
    started = {key: threading.Event() for key in PEERS}
    ran: list[tuple[str, int]] = []

    def job(key: str, i: int):
        def run() -> None:
            if i == 0:
                started[key].set()
                gate.wait()  # a write blocked on a peer that does not read
            ran.append((key, i))

        return run

    for key in PEERS:
        for i in range(QUEUED):
            workers.submit(key, job(key, i))
    for event in started.values():
        event.wait()
    closer = threading.Thread(target=workers.close)
    closer.start()
    while workers._queues:  # close has taken the queues: it has begun
        time.sleep(0.001)
    gate.set()  # the writes in flight finish
    closer.join()
    assert sorted(ran) == [(key, 0) for key in PEERS]  # nothing queued ran after close


def test_a_job_submitted_after_close_never_runs() -> None:
    workers = PeerWorkers("test")
    workers.close()
    ran: list[int] = []
    workers.submit("a", lambda: ran.append(1))
    workers.close()
    assert ran == []
