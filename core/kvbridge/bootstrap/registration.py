"""A prefill rank's registration with bootstrap, kept across bootstrap restarts.

:class:`PrefillRegistration` keeps the rank registrations and published room assignments of
the prefill ranks of this process and, on a background thread, registers them again when the
bootstrap server lost them (its ``instance`` changed: it restarted, or it was down at start)
and re-publishes recent rooms, so the scheduler thread never waits on bootstrap.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from kvbridge.bootstrap.http_client import (
    BootstrapClient,
    BootstrapError,
    BootstrapUnreachable,
    backoff,
)
from kvbridge.config import TransferConfig

log = logging.getLogger("kvbridge.bootstrap")

#: Rooms per PUT (the server's per-request limit).
MAX_BATCH = 65_536


class PrefillRegistration:
    """Kept registrations and room assignments of one process's prefill ranks.

    ``backoff_max`` bounds retry pauses; every ``check_interval`` the upkeep thread (started by
    the first :meth:`register` or :meth:`publish_rooms`) checks each server it registered with
    and registers again if the server's ``instance`` changed; rooms published within
    ``republish_horizon`` seconds are published again then. :meth:`close` ends the thread.
    """

    def __init__(
        self,
        client: BootstrapClient | None = None,
        *,
        backoff_max: float = 5.0,
        check_interval: float = 5.0,
        republish_horizon: float = 300.0,
        max_pending_rooms: int = 1 << 20,
        start_grace: float = 60.0,
    ) -> None:
        self.client = client or BootstrapClient()
        #: Seconds a server that never answered may stay unreachable before that is a WARNING.
        self.start_grace = start_grace
        self.backoff_max = backoff_max
        self.check_interval = check_interval
        self.republish_horizon = republish_horizon
        self.max_pending_rooms = max_pending_rooms
        self._lock = threading.Lock()
        #: (addr, rank coordinates) -> entry, for every registration to keep.
        self._kept: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
        #: addr -> the server instance that holds our registrations (None: not registered).
        self._instances: dict[str, str | None] = {}
        #: addr -> when the first registration there was tried (monotonic).
        self._first_tried: dict[str, float] = {}
        self._pending_rooms: dict[str, dict[int, int]] = collections.defaultdict(dict)
        self._published: dict[str, collections.OrderedDict[int, tuple[int, float]]] = (
            collections.defaultdict(collections.OrderedDict)
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: TransferConfig) -> PrefillRegistration:
        return cls(
            BootstrapClient.from_config(config),
            backoff_max=config.bootstrap_backoff_max,
            check_interval=config.heartbeat_interval,
            republish_horizon=config.bootstrap_timeout,
            start_grace=config.bootstrap_timeout,
        )

    def register(
        self, addr: str, entry: Mapping[str, Any], *, attempts: int = 1, interval: float = 0.1
    ) -> Any:
        """Register a prefill rank and keep the registration: it is sent again whenever the
        server restarted, and, if the server is still unreachable after ``attempts``, sent by
        the background thread once it answers (this returns None then instead of raising).
        Definitive errors (a conflicting or invalid registration) raise.

        One attempt by default, so an engine's start never waits here: engines commonly
        start their bootstrap server after their ranks (vLLM's scheduler, after the workers
        registered their KV caches)."""
        entry = dict(entry)
        coords = tuple(int(entry[k]) for k in ("dp_rank", "pp_rank", "cp_rank", "tp_rank"))
        with self._lock:
            self._kept[(addr, coords)] = entry
            self._instances.setdefault(addr, None)
            self._first_tried.setdefault(addr, time.monotonic())
        try:
            answer = self.client.register_rank(addr, entry, attempts=attempts, interval=interval)
        except BootstrapUnreachable as exc:
            log.info("%s (not started yet?); the registration will be sent when it answers", exc)
            self._start()
            return None
        self._note_instance(addr, answer)
        self._start()
        return answer

    def publish_rooms(self, addr: str, dp_ranks: Mapping[int, int]) -> None:
        """Non-blocking ``BootstrapClient.put_rooms``: queued for the background thread,
        retried with back-off, and re-published if the server restarts within
        ``republish_horizon``."""
        with self._lock:
            pending = self._pending_rooms[addr]
            pending.update(dp_ranks)
            while len(pending) > self.max_pending_rooms:  # the oldest go first
                room = next(iter(pending))
                del pending[room]
                log.warning("bootstrap %s: dropped unpublished room %d (queue full)", addr, room)
        self._start()
        self._wake.set()

    def _note_instance(self, addr: str, answer: Any) -> None:
        instance = answer.get("instance") if isinstance(answer, dict) else None
        with self._lock:
            self._instances[addr] = str(instance) if instance is not None else ""

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._upkeep, name="kvbridge-bootstrap-upkeep", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """End the background thread (waits at most about one request timeout)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(self.client.timeout + 5)

    def _upkeep(self) -> None:
        failures: dict[str, int] = collections.defaultdict(int)
        retry_at: dict[str, float] = {}
        next_check: dict[str, float] = {}
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                kept = set(self._instances)
                addresses = kept | {a for a, p in self._pending_rooms.items() if p}
            for addr in sorted(addresses):
                if self._stop.is_set():
                    return
                if retry_at.get(addr, 0.0) > now:
                    continue
                try:
                    if addr in kept and next_check.get(addr, 0.0) <= now:
                        self._check_registration(addr, now)
                        next_check[addr] = now + self.check_interval
                    self._publish_pending(addr, now)
                except BootstrapError as exc:
                    failures[addr] += 1
                    if failures[addr] == 1 or failures[addr] % 20 == 0:
                        log.log(self._upkeep_level(addr, now), "bootstrap upkeep %s: %s", addr, exc)
                    retry_at[addr] = now + backoff(failures[addr], self.backoff_max)
                    continue
                if failures.pop(addr, 0):
                    log.info("bootstrap upkeep %s: answering again", addr)

    def _upkeep_level(self, addr: str, now: float) -> int:
        """INFO while a server that never answered is within ``start_grace`` of the first
        try (the expected start-up order), WARNING otherwise."""
        with self._lock:
            never_answered = self._instances.get(addr, "") is None
            first = self._first_tried.get(addr, now)
        starting = never_answered and now - first < self.start_grace
        return logging.INFO if starting else logging.WARNING

    def _check_registration(self, addr: str, now: float) -> None:
        """Register this client's ranks at ``addr`` again if the server lost them."""
        with self._lock:
            kept = [e for (a, _), e in self._kept.items() if a == addr]
            known = self._instances.get(addr)
        if known is not None and str(self.client.status(addr).get("instance", "")) == known:
            return
        if known is not None:
            log.warning("bootstrap %s restarted: registering %d rank(s) again", addr, len(kept))
        answer = None
        for entry in kept:
            answer = self.client.request("PUT", addr, "/v1/ranks", entry)
        self._note_instance(addr, answer)
        if known is not None:
            self._republish(addr, now)

    def _publish_pending(self, addr: str, now: float) -> None:
        with self._lock:
            batch = dict(itertools.islice(self._pending_rooms.get(addr, {}).items(), MAX_BATCH))
        if not batch:
            return
        try:
            self.client.put_rooms(addr, batch)
        except BootstrapError as exc:
            if exc.transient:
                raise
            log.error("bootstrap %s refused %d room assignment(s): %s", addr, len(batch), exc)
            with self._lock:
                pending = self._pending_rooms[addr]
                for room in batch:
                    pending.pop(room, None)
            return
        with self._lock:
            pending = self._pending_rooms[addr]
            published = self._published[addr]
            for room, dp in batch.items():
                if pending.get(room) == dp:
                    del pending[room]
                published.pop(room, None)
                published[room] = (dp, now)
            while published and (
                next(iter(published.values()))[1] < now - self.republish_horizon
                or len(published) > self.max_pending_rooms
            ):
                published.popitem(last=False)

    def _republish(self, addr: str, now: float) -> None:
        with self._lock:
            published = self._published[addr]
            horizon = now - self.republish_horizon
            again = {r: dp for r, (dp, at) in published.items() if at >= horizon}
            pending = self._pending_rooms[addr]
            for room, dp in again.items():
                pending.setdefault(room, dp)
