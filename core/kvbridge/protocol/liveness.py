"""Which prefill ranks writing into this decode rank have gone quiet (pure: no clock inside).

A prefill rank sends a heartbeat every ``heartbeat_interval`` to each decode rank it has live
rooms with. This decode rank starts expecting them from a writer once it has sent that writer
metadata, and declares it dead after ``heartbeat_interval x heartbeat_max_misses`` of silence.
Only writers of live rooms are tracked, so a heartbeat from anyone else changes nothing.

Silence is counted only while this rank is looking: if its own loop stalled for longer than
an interval (a starved process reads neither its socket nor its clock), the stall is not
held against the writers; their heartbeats may be waiting, unread, in this rank's socket.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable


class WriterLiveness:
    def __init__(self, interval: float, max_misses: int) -> None:
        self.interval = interval
        self.limit = interval * max_misses
        self._check_every = interval / 2
        self._last: dict[Hashable, float] = {}
        self._next_check = 0.0
        self._looked: float | None = None
        #: This rank's own stalls (longer than an interval) not counted against writers.
        self.own_stalls = 0

    def looking(self, now: float) -> None:
        """This rank's loop runs now (call once per step, before :meth:`heard`)."""
        last, self._looked = self._looked, now
        if last is None:
            return
        gap = now - last
        if gap > self.interval:
            self.own_stalls += 1
            for writer, t in self._last.items():
                self._last[writer] = min(now, t + gap)

    def __len__(self) -> int:
        return len(self._last)

    def expect(self, writer: Hashable, now: float) -> None:
        """``writer`` was sent metadata: from now on its silence counts."""
        self._last.setdefault(writer, now)

    def heard(self, writer: Hashable, now: float) -> None:
        if writer in self._last:
            self._last[writer] = now

    def silence(self, writer: Hashable, now: float) -> float:
        return now - self._last.get(writer, now)

    def due(self, now: float) -> bool:
        """Whether :meth:`dead` would look now (callers skip building ``in_use`` if not)."""
        return now >= self._next_check and bool(self._last)

    def dead(self, now: float, in_use: Collection[Hashable] | None = None) -> list[Hashable]:
        """Writers silent for longer than the limit (then forgotten). Cheap between checks.

        ``in_use`` (writers of live rooms) lets writers nobody waits for any more be dropped.
        """
        if now < self._next_check or not self._last:
            return []
        self._next_check = now + self._check_every
        if in_use is not None:
            for writer in [w for w in self._last if w not in in_use]:
                del self._last[writer]
        gone = [w for w, t in self._last.items() if now - t > self.limit]
        for writer in gone:
            del self._last[writer]
        return gone
