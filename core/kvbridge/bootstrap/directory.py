"""The decode side's prefill directory, backed by bootstrap servers.

:class:`BootstrapDirectory` answers the scheduler without blocking: what is known now is
returned, what is not is fetched by one background thread, which also watches every prefill
address in use for re-registration (see :meth:`BootstrapDirectory._on_health`). Which ranks
write a room is the protocol's (:func:`kvbridge.protocol.plan.plan_for`); this module only
fetches what it needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from kvbridge.bootstrap.http_client import (
    BootstrapClient,
    BootstrapError,
    BootstrapUnreachable,
    backoff,
)
from kvbridge.bootstrap.schema import BadRequest, validate_info
from kvbridge.config import TransferConfig
from kvbridge.errors import ConfigError, KVBridgeError
from kvbridge.protocol.decode import DecodeRequest
from kvbridge.protocol.plan import (
    PrefillKey,
    PrefillTarget,
    plan_for,
    registered_control,
    transfer_controls,
)
from kvbridge.transport.loading import check_api_version

log = logging.getLogger("kvbridge.bootstrap")


@attrs.frozen
class DecodeExpectation:
    """What this decode instance needs a prefill to match."""

    transport: str
    kv_dtype: str
    kv_layout: str
    page_size: int
    page_bytes: int
    num_kv_regions: int
    api_version: str


def check_compatible(info: Mapping[str, Any], mine: DecodeExpectation) -> None:
    """Raise :class:`ConfigError` naming both values for every mismatch that matters."""
    for key in ("transport", "kv_dtype", "kv_layout", "page_size", "num_kv_regions"):
        if info.get(key) != getattr(mine, key):
            raise ConfigError(
                f"prefill {key} is {info.get(key)!r} but this decode uses {getattr(mine, key)!r}"
            )
    try:
        check_api_version(str(info.get("api_version")), mine.api_version)
    except KVBridgeError as exc:
        raise ConfigError(
            f"prefill plugin API {info.get('api_version')!r} vs decode {mine.api_version!r}: {exc}"
        ) from None
    if info["sizes"]["pp_size"] != 1:
        raise ConfigError(
            f"prefill pipeline parallelism (pp_size {info['sizes']['pp_size']}) "
            "is not supported yet"
        )


@attrs.define
class _Address:
    """What the directory knows about one prefill bootstrap address."""

    last_used: float
    info: dict[str, Any] | None = None
    #: ``(instance, generation)`` of ``info``: another value on /health means re-registration.
    version: tuple[str, int] | None = None
    #: Whether a target of this address was ever handed out (see ``on_lost``).
    served: bool = False
    #: Set while the address is refused: new requests fail with it until ``retry_at``.
    failure: str | None = None
    retry_at: float = 0.0
    #: Refused because it stopped answering after it had served: its ``/health`` is probed,
    #: and an answer (a restarted prefill) lifts the refusal before ``retry_at``.
    probe: bool = False
    #: Since when requests have been waiting for ``info``.
    waiting_since: float = 0.0
    errors: int = 0
    definitive: int = 0
    next_try: float = 0.0
    misses: int = 0
    next_health: float = 0.0
    targets: dict[int, PrefillTarget | str] = attrs.Factory(dict)
    #: The info version whose ranks liveness saw die, and until when it is not handed out
    #: again (a restarted prefill re-registers with another version before that, normally).
    dead_version: tuple[str, int] | None = None
    dead_until: float = 0.0

    def need_info(self, now: float) -> None:
        self.info = self.version = None
        self.targets.clear()
        self.failure = None
        self.probe = False
        self.waiting_since = self.next_try = now
        self.errors = self.definitive = self.misses = 0


@attrs.define
class _RoomWait:
    """A room whose prefill DP rank is being asked for."""

    since: float
    next_try: float = 0.0
    errors: int = 0
    definitive: int = 0


class BootstrapDirectory:
    """:class:`~kvbridge.runtime.wiring.PrefillDirectory` backed by bootstrap servers.

    Look-ups that get "starting" (503) or no answer are retried with back-off (up to
    ``bootstrap_backoff_max``) until ``bootstrap_timeout``; definitive errors (401, 400, ...)
    ``bootstrap_max_attempts`` times. An address that failed refuses new requests for
    ``bootstrap_retry_after`` seconds, then its info is fetched afresh, so a restarted prefill
    serves new requests. One that had served and became unreachable is probed on ``/health``
    meanwhile: once it answers (restarted), the refusal ends at once. What health checks do
    is :meth:`_on_health`'s policy. Addresses no
    request asked for in ``bootstrap_timeout + bootstrap_retry_after`` are forgotten (the
    client holds no socket between requests).
    """

    def __init__(
        self,
        config: TransferConfig,
        decode_rank: int,
        decode_tp: int,
        expectation: DecodeExpectation,
        *,
        client: BootstrapClient | None = None,
        on_lost: Callable[[str, str], None] | None = None,
        dp_follows_room: bool = False,
    ) -> None:
        self.config = config
        self.decode_rank = decode_rank
        self.decode_tp = decode_tp
        self.expectation = expectation
        self.client = client or BootstrapClient.from_config(config)
        self.on_lost = on_lost
        self.dp_follows_room = dp_follows_room
        self.forget_after = config.bootstrap_timeout + config.bootstrap_retry_after
        self._lock = threading.Lock()
        self._addresses: dict[str, _Address] = {}
        self._room_dp: dict[int, int] = {}
        self._room_failures: dict[int, str] = {}
        self._wanted_rooms: dict[str, dict[int, _RoomWait]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="kvbridge-bootstrap-client", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(self.config.bootstrap_http_timeout + 5)

    @property
    def addresses(self) -> list[str]:
        """The prefill addresses currently remembered (for tests and diagnostics)."""
        with self._lock:
            return sorted(self._addresses)

    def writer_dead(self, addr: str) -> None:
        """Liveness declared a rank of ``addr`` dead: stop handing out its cached ranks.

        New requests wait (retried like a starting prefill) until bootstrap lists other
        ranks, a restarted prefill, or ``bootstrap_retry_after`` passed (the ranks may only
        have been partitioned). Rooms already resolved keep their targets.
        """
        now = time.monotonic()
        with self._lock:
            state = self._addresses.get(addr)
            if state is None or state.info is None:
                return
            state.dead_version = state.version
            state.dead_until = now + self.config.bootstrap_retry_after
            state.need_info(now)
        self._wake.set()

    def watch(self, addr: str) -> None:
        """Rooms fenced on a dead rank of ``addr`` wait for that rank's replacement: keep the
        address remembered and look it up again once a refusal has expired. No new request
        for ``addr`` may ever come to do it, and only a fresh look-up shows a new process."""
        now = time.monotonic()
        wake = False
        with self._lock:
            state = self._addresses.get(addr)
            if state is None:
                state = self._addresses[addr] = _Address(last_used=now)
                state.need_info(now)
                wake = True
            state.last_used = now
            if state.failure is not None and now >= state.retry_at:
                log.info("looking up prefill bootstrap %s again (fenced rooms wait on it)", addr)
                state.need_info(now)
                wake = True
        if wake:
            self._wake.set()

    def rank_control(self, key: PrefillKey) -> str | None:
        """The control address the prefill rank ``key`` registered last, from cached info."""
        info = self._info(key.addr)
        return registered_control(info, key) if info is not None else None

    def controls_of(self, addr: str) -> list[str]:
        """Control addresses of every transferring prefill rank of ``addr``, from cached info.

        For telling a prefill about a room decode gave up on before resolving its DP rank;
        empty until the info was fetched (``DecodeNode`` holds such an abort until it is).
        """
        info = self._info(addr)
        return transfer_controls(info) if info is not None else []

    def _info(self, addr: str) -> dict[str, Any] | None:
        with self._lock:
            state = self._addresses.get(addr)
            return state.info if state is not None else None

    # -- called by the scheduler thread ---------------------------------------------------------

    def resolve(self, requests: Sequence[DecodeRequest]) -> dict[int, PrefillTarget | str]:
        found: dict[int, PrefillTarget | str] = {}
        wake = False
        now = time.monotonic()
        with self._lock:
            for request in requests:
                addr = request.bootstrap_addr
                if not addr:
                    found[request.room] = "request has no bootstrap address"
                    continue
                state = self._addresses.get(addr)
                if state is None:
                    state = self._addresses[addr] = _Address(last_used=now)
                    state.need_info(now)
                    wake = True
                state.last_used = now
                if state.failure is not None:
                    if now < state.retry_at:
                        found[request.room] = state.failure
                        continue
                    log.info("trying prefill bootstrap %s again", addr)
                    state.need_info(now)  # a restarted prefill may answer now
                    wake = True
                if state.info is None:
                    continue
                dp = self._dp_rank_of(request, state.info)
                if dp is None:
                    failure = self._room_failures.get(request.room)
                    if failure is not None:
                        found[request.room] = failure
                        continue
                    waits = self._wanted_rooms.setdefault(addr, {})
                    if request.room not in waits:
                        waits[request.room] = _RoomWait(since=now, next_try=now)
                        wake = True
                    continue
                target = self._target(addr, state, dp)
                state.served = state.served or isinstance(target, PrefillTarget)
                found[request.room] = target
        if wake:
            self._wake.set()
        return found

    def _dp_rank_of(self, request: DecodeRequest, info: dict[str, Any]) -> int | None:
        dp_size = info["sizes"]["dp_size"]
        if request.prefill_dp_rank is not None:
            return request.prefill_dp_rank
        if dp_size == 1:
            return 0
        if self.dp_follows_room:
            return request.room % dp_size
        return self._room_dp.get(request.room)

    def _target(self, addr: str, state: _Address, dp: int) -> PrefillTarget | str:
        cached = state.targets.get(dp)
        if cached is None:
            assert state.info is not None
            cached = state.targets[dp] = plan_for(
                addr,
                state.info,
                dp,
                decode_rank=self.decode_rank,
                decode_tp=self.decode_tp,
                decode_page_bytes=self.expectation.page_bytes,
            )
        return cached

    # -- background thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                self._forget_idle(now)
                fetch = [
                    (a, s)
                    for a, s in self._addresses.items()
                    if s.info is None and s.failure is None and s.next_try <= now
                ]
                queries = {
                    a: sorted(r for r, w in waits.items() if w.next_try <= now)
                    for a, waits in self._wanted_rooms.items()
                }
                health = [
                    (a, s)
                    for a, s in self._addresses.items()
                    if s.next_health <= now
                    and ((s.info is not None and s.failure is None) or s.probe)
                ]
            for addr, state in fetch:
                if not self._stop.is_set():
                    self._fetch_info(addr, state)
            for addr, rooms in queries.items():
                if rooms and not self._stop.is_set():
                    self._query_rooms(addr, rooms)
            for addr, state in health:
                if self._stop.is_set():
                    break
                try:
                    answer: dict[str, Any] | None = self.client.status(addr)
                    error = None
                except BootstrapError as exc:
                    answer, error = None, exc
                with self._lock:
                    if state.probe:
                        self._on_probe(addr, state, answer, time.monotonic())
                    else:
                        self._on_health(addr, state, answer, error, time.monotonic())

    def _forget_idle(self, now: float) -> None:
        for addr, state in list(self._addresses.items()):
            if now - state.last_used > self.forget_after and not self._wanted_rooms.get(addr):
                del self._addresses[addr]
                self._wanted_rooms.pop(addr, None)
                log.info("forgot prefill bootstrap %s (no request for it)", addr)

    def offer(self, addr: str, info: Mapping[str, Any]) -> str | None:
        """Take bootstrap info for ``addr`` that the caller fetched itself, instead of fetching
        it again: for an engine that must know a prefill's sizes before it adds a request
        (SGLang's decode asks for them first, through its own look-up).

        ``info`` is untrusted: it is checked as the directory's own look-ups are, and the
        requests for ``addr`` then resolve at once. Info already held is kept (its health
        checks own re-registration). Returns None when the info is in use, or the reason
        the prefill is refused (then requests for ``addr`` fail with it, as after a
        look-up of the directory's own).
        """
        now = time.monotonic()
        lost = reason = None
        with self._lock:
            state = self._addresses.get(addr)
            if state is None:
                state = self._addresses[addr] = _Address(last_used=now)
                state.need_info(now)
            state.last_used = now
            if state.info is not None:
                return None
            if state.failure is not None:
                if now < state.retry_at:
                    return state.failure
                state.need_info(now)
            outcome = self._checked(addr, info)
            if isinstance(outcome, tuple):
                self._take_info(state, *outcome, now)
            elif isinstance(outcome, ConfigError):
                reason = f"prefill {addr} refused: {outcome}"
                lost = self._fail_address(addr, state, reason)
            else:  # malformed: the directory's own look-ups go on (with back-off)
                reason = str(outcome)
                lost = self._lookup_failed(addr, state, outcome)
        if lost is not None and self.on_lost is not None:
            self.on_lost(addr, lost)
        return reason

    def _checked(
        self, addr: str, info: Any
    ) -> tuple[dict[str, Any], tuple[str, int]] | ConfigError | BootstrapError:
        """Validate a bootstrap answer: the info and its ``(instance, generation)``, the
        reason the prefill is refused, or what is malformed about the answer."""
        try:
            checked = validate_info(info)
            check_compatible(checked, self.expectation)
        except ConfigError as exc:
            return exc
        except BadRequest as exc:
            return BootstrapError(f"bootstrap {addr} answered malformed info: {exc}")
        return checked, (checked["instance"], checked["generation"])

    def _take_info(
        self, state: _Address, info: dict[str, Any], version: tuple[str, int], now: float
    ) -> None:
        """Use checked info for ``state`` (lock held)."""
        if version == state.dead_version and now < state.dead_until:
            # The ranks liveness saw die are still what bootstrap lists: wait for the
            # restarted prefill to register (or for dead_until) before using them.
            state.next_try = now + backoff(2, self.config.bootstrap_backoff_max)
        elif state.failure is None:
            state.need_info(now)
            state.info = info
            state.version = version
            state.next_health = now + self.config.heartbeat_interval

    def _fetch_info(self, addr: str, state: _Address) -> None:
        lost = None
        try:
            answer: Any = self.client.info(addr)
        except BootstrapError as exc:
            with self._lock:
                lost = self._lookup_failed(addr, state, exc)
        else:
            outcome = self._checked(addr, answer)
            with self._lock:
                if isinstance(outcome, tuple):
                    self._take_info(state, *outcome, time.monotonic())
                elif isinstance(outcome, ConfigError):
                    lost = self._fail_address(addr, state, f"prefill {addr} refused: {outcome}")
                elif state.info is None:  # not meanwhile offered a good answer
                    lost = self._lookup_failed(addr, state, outcome)
        if lost is not None and self.on_lost is not None:
            self.on_lost(addr, lost)

    def _on_probe(
        self, addr: str, state: _Address, answer: dict[str, Any] | None, now: float
    ) -> None:
        """A refused address that had served answers ``/health`` again (called under the
        lock): the prefill restarted, so new requests wait for its info from now on instead
        of failing until ``retry_at``."""
        state.next_health = now + self.config.heartbeat_interval
        if answer is not None and state.failure is not None:
            log.info("prefill bootstrap %s answers again: new requests are served", addr)
            state.need_info(now)

    def _lookup_failed(self, addr: str, state: _Address, exc: BootstrapError) -> str | None:
        now = time.monotonic()
        state.errors += 1
        if not exc.transient:
            state.definitive += 1
        waited = now - state.waiting_since
        if state.definitive >= self.config.bootstrap_max_attempts:
            reason = f"prefill bootstrap {addr} not usable after {state.definitive} attempts: {exc}"
            return self._fail_address(addr, state, reason)
        if waited >= self.config.bootstrap_timeout:
            reason = (
                f"prefill bootstrap {addr} not usable after {waited:.1f}s "
                f"({state.errors} attempts): {exc}"
            )
            lost = self._fail_address(addr, state, reason)
            if isinstance(exc, BootstrapUnreachable) and state.served:  # watch for its return
                state.probe = True
                state.next_health = now + self.config.heartbeat_interval
            return lost
        state.next_try = now + backoff(state.errors, self.config.bootstrap_backoff_max)
        if state.errors == 1 or state.errors % 10 == 0:
            log.info("prefill bootstrap %s not ready (retrying): %s", addr, exc)
        return None

    def _fail_address(self, addr: str, state: _Address, reason: str) -> str | None:
        """Refuse ``addr`` for ``bootstrap_retry_after``; the reason goes to waiting rooms.

        Returns the reason for ``on_lost`` only when no target of this address was ever
        handed out: then every queued room of the address is one still waiting, and failing
        them all fails nothing that was resolved.
        """
        now = time.monotonic()
        state.need_info(now)
        state.failure = reason
        state.retry_at = now + self.config.bootstrap_retry_after
        self._wanted_rooms.pop(addr, None)  # resolve() answers their rooms with the reason
        log.error(
            "%s; new requests for it fail for %gs, then it is tried again",
            reason,
            self.config.bootstrap_retry_after,
        )
        return None if state.served else reason

    def _query_rooms(self, addr: str, rooms: list[int]) -> None:
        error: BootstrapError | None = None
        try:
            answer = self.client.query_rooms(addr, rooms)
        except BootstrapError as exc:
            answer, error = {}, exc
        now = time.monotonic()
        with self._lock:
            waits = self._wanted_rooms.get(addr, {})
            for room in rooms:
                wait = waits.get(room)
                if wait is None:
                    continue
                dp = answer.get(room)
                if isinstance(dp, int) and not isinstance(dp, bool):
                    self._room_dp[room] = dp
                    del waits[room]
                    continue
                wait.errors += 1
                if error is not None and not error.transient:
                    wait.definitive += 1
                waited = now - wait.since
                if (
                    wait.definitive >= self.config.bootstrap_max_attempts
                    or waited >= self.config.bootstrap_timeout
                ):
                    why = str(error) if error is not None else "no DP rank published for it"
                    self._room_failures[room] = (
                        f"DP rank of room {room} unknown at {addr} after {waited:.1f}s "
                        f"({wait.errors} queries): {why}"
                    )
                    del waits[room]
                else:
                    wait.next_try = now + backoff(wait.errors, self.config.bootstrap_backoff_max)

    def _on_health(
        self,
        addr: str,
        state: _Address,
        answer: dict[str, Any] | None,
        error: BootstrapError | None,
        now: float,
    ) -> None:
        """The bootstrap liveness policy, in one place (called under the lock).

        A bootstrap server's ``/health`` is a change detector for a prefill address, not the
        liveness signal of its rooms:

        - Same ``(instance, generation)`` as the info in use: nothing to do.
        - Another one (the prefill or its bootstrap server restarted, or ranks registered
          again): the info is fetched afresh; new requests wait for it and get the new ranks.
          Rooms already resolved keep their targets.
        - No answer: counted; after ``heartbeat_max_misses`` in a row a warning is logged once.
          Nothing fails because of it: rooms already resolved carry on (their liveness is the
          control channel's and the transport's: prefill status and heartbeats, transfer
          failures, ``waiting_timeout``), and new requests are still resolved from the info in
          use, since a bootstrap server can die while its prefill ranks live. Rooms still
          waiting for their DP rank keep being queried with back-off and fail only after
          ``bootstrap_timeout``.

        ``on_lost(addr, reason)`` is called only when an address that never served a target
        cannot be resolved (see :meth:`_fail_address`).
        """
        state.next_health = now + self.config.heartbeat_interval
        if answer is None:
            state.misses += 1
            if state.misses == self.config.heartbeat_max_misses:
                log.warning(
                    "prefill bootstrap %s missed %d health checks (%s); resolved rooms carry "
                    "on, new requests use the ranks registered before",
                    addr,
                    state.misses,
                    error,
                )
            return
        if state.misses >= self.config.heartbeat_max_misses:
            log.info("prefill bootstrap %s answers again", addr)
        state.misses = 0
        try:
            version = (str(answer.get("instance")), int(answer.get("generation", 0)))
        except (TypeError, ValueError):
            return
        if version != state.version:
            log.info(
                "prefill %s changed registration (instance %s generation %d): fetching its ranks",
                addr,
                version[0],
                version[1],
            )
            state.need_info(now)

    def forget_room(self, room: int) -> None:
        with self._lock:
            self._room_dp.pop(room, None)
            self._room_failures.pop(room, None)
            for waits in self._wanted_rooms.values():
                waits.pop(room, None)
