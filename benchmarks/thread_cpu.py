"""CPU time of every thread of this process, grouped by who runs it (Linux only).

``/proc/self/task/<tid>/schedstat`` gives each thread's run time in nanoseconds, native
threads included (ZMQ's I/O thread, gloo's, UCX's progress thread, Mooncake's), which
``time.thread_time`` cannot reach: it only reads the calling thread. Python threads are named
by their ``threading`` name, the others by their kernel ``comm``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
#: tid -> (thread name, CPU nanoseconds so far).
Snapshot = dict[int, tuple[str, int]]

#: (name prefix, group), first match wins. "scheduler" is not here: the benchmark's main
#: thread also runs its own bookkeeping, so it times the node calls themselves (:class:`Meter`).
GROUPS = (
    ("MainThread", "main"),
    ("kvbridge-control-", "control"),
    ("kvbridge-bootstrap", "bootstrap"),
    ("kvbridge-send-", "send_workers"),
    ("kvbridge-fake-", "fake_receive"),
    ("bench-raw-", "raw_receive"),
    # With NIXL's progress thread off this thread does its work: count it with the library.
    ("kvbridge-nixl-progress-", "library"),
    ("native:ZMQbg", "zmq_io"),
)


def group_of(name: str) -> str:
    for prefix, group in GROUPS:
        if name.startswith(prefix):
            return group
    return "library" if name.startswith("native:") else "other_python"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the thread ended between listing and reading
        return None


def snapshot() -> Snapshot:
    """tid -> (name, CPU nanoseconds so far) for every live thread of this process."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: Snapshot = {}
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        stat = _read(f"/proc/self/task/{entry}/schedstat")
        if stat is None:
            continue
        name = names.get(tid)
        if name is None:
            comm = (_read(f"/proc/self/task/{entry}/comm") or "?").strip()
            name = f"native:{comm}"
        out[tid] = (name, int(stat.split()[0]))
    return out


def by_group(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]
) -> dict[str, int]:
    """CPU nanoseconds each group spent between two snapshots (threads born since count
    from zero; threads that ended meanwhile are lost, which no group here does)."""
    out: dict[str, int] = {}
    for tid, (name, ns) in after.items():
        start = before.get(tid)
        spent = ns - (start[1] if start is not None and start[0] == name else 0)
        group = group_of(name)
        out[group] = out.get(group, 0) + spent
    return out


def by_name(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]
) -> dict[str, int]:
    """As :func:`by_group`, per thread name (for the library threads' breakdown)."""
    out: dict[str, int] = {}
    for tid, (name, ns) in after.items():
        start = before.get(tid)
        out[name] = out.get(name, 0) + ns - (start[1] if start is not None else 0)
    return out


class Meter:
    """Thread CPU time of calls made on the calling thread, summed (``time.thread_time_ns``)."""

    def __init__(self) -> None:
        self.ns = 0
        self.calls = 0

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        t0 = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            self.ns += time.thread_time_ns() - t0
            self.calls += 1

    def take(self) -> tuple[int, int]:
        """(ns, calls) since the last take."""
        out = (self.ns, self.calls)
        self.ns = self.calls = 0
        return out


class PhaseProfile:
    """cProfile of the calling thread, on CPU time (``time.thread_time``), written to
    ``<directory>/<name>.pstats`` at :meth:`stop`; a no-op without a directory."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._profile: Any = None

    def start(self) -> None:
        if self.directory:
            import cProfile

            self._profile = cProfile.Profile(time.thread_time)
            self._profile.enable()

    def stop(self, name: str) -> None:
        if self._profile is not None:
            self._profile.disable()
            os.makedirs(self.directory or ".", exist_ok=True)
            self._profile.dump_stats(os.path.join(self.directory or ".", f"{name}.pstats"))
            self._profile = None


class MeteredReducer:
    """A reducer whose calls are also timed: a step's collective, told apart from the rest."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.meter = Meter()

    def __call__(self, local: Any, rooms: Any) -> Any:
        return self.meter(self.inner, local, rooms)
