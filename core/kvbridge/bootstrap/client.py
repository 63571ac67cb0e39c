"""Bootstrap client (blocking HTTP, stdlib only) and the decode side's prefill directory.

The directory answers the scheduler without blocking: what is known now is returned, what is
not is fetched by one background thread, which also health-checks every prefill address in use.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from kvbridge.config import TransferConfig
from kvbridge.errors import ConfigError, KVBridgeError
from kvbridge.mapping import AUTHORITATIVE_CP_RANK, Route, routes, sources_of, targets_of
from kvbridge.plugins import check_api_version
from kvbridge.queue.decode import DecodeRequest
from kvbridge.queue.session import PrefillTarget

log = logging.getLogger("kvbridge.bootstrap")


class BootstrapError(KVBridgeError):
    pass


class BootstrapNotReady(BootstrapError):
    pass


class BootstrapClient:
    def __init__(self, token: str | None = None, timeout: float = 2.0) -> None:
        self.token = token
        self.timeout = timeout

    def request(self, method: str, addr: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{addr}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            if exc.code == 503:
                raise BootstrapNotReady(f"{addr}: {message}") from None
            raise BootstrapError(f"bootstrap {addr}{path} answered {exc.code}: {message}") from None
        except (OSError, ValueError) as exc:
            raise BootstrapError(f"bootstrap {addr} unreachable: {exc}") from None

    def register_rank(
        self, addr: str, entry: Mapping[str, Any], *, attempts: int = 50, interval: float = 0.1
    ) -> Any:
        """Register a prefill rank, retrying while the server is starting."""
        for attempt in range(attempts):
            try:
                return self.request("PUT", addr, "/v1/ranks", dict(entry))
            except BootstrapError as exc:
                if "unreachable" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(interval)
        raise AssertionError("unreachable")

    def put_rooms(self, addr: str, dp_ranks: Mapping[int, int]) -> None:
        self.request("PUT", addr, "/v1/rooms", {"rooms": {str(k): v for k, v in dp_ranks.items()}})

    def info(self, addr: str) -> dict[str, Any]:
        return self.request("GET", addr, "/v1/info")

    def query_rooms(self, addr: str, rooms: Sequence[int]) -> dict[int, int | None]:
        answer = self.request("POST", addr, "/v1/rooms/query", {"rooms": list(rooms)})
        return {int(k): v for k, v in answer["dp_ranks"].items()}

    def health(self, addr: str) -> bool:
        try:
            self.request("GET", addr, "/health")
            return True
        except BootstrapError:
            return False


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


@attrs.frozen
class Contact:
    """A prefill rank this decode rank sends metadata to, for one (address, DP rank)."""

    prefill_key: str
    control: str
    expected: int
    route: Route | None


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
    info: dict[str, Any] | None = None
    failure: str | None = None
    attempts: int = 0
    next_try: float = 0.0
    misses: int = 0
    targets: dict[int, PrefillTarget | str] = attrs.Factory(dict)


class BootstrapDirectory:
    """:class:`~kvbridge.queue.session.PrefillDirectory` backed by bootstrap servers."""

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
        self.client = client or BootstrapClient(config.bootstrap_token)
        self.on_lost = on_lost
        self.dp_follows_room = dp_follows_room
        self._lock = threading.Lock()
        self._addresses: dict[str, _Address] = {}
        self._room_dp: dict[int, int] = {}
        self._room_failures: dict[int, str] = {}
        self._wanted_rooms: dict[str, set[int]] = collections.defaultdict(set)
        self._room_attempts: dict[int, int] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="kvbridge-bootstrap-client", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)

    # -- called by the scheduler thread ---------------------------------------------------------

    def resolve(self, requests: Sequence[DecodeRequest]) -> dict[int, PrefillTarget | str]:
        found: dict[int, PrefillTarget | str] = {}
        wake = False
        with self._lock:
            for request in requests:
                addr = request.bootstrap_addr
                if not addr:
                    found[request.room] = "request has no bootstrap address"
                    continue
                state = self._addresses.get(addr)
                if state is None:
                    state = self._addresses[addr] = _Address()
                    wake = True
                if state.failure is not None:
                    found[request.room] = state.failure
                    continue
                if state.info is None:
                    continue
                dp = self._dp_rank_of(request, state.info)
                if dp is None:
                    failure = self._room_failures.get(request.room)
                    if failure is not None:
                        found[request.room] = failure
                    elif request.room not in self._wanted_rooms[addr]:
                        self._wanted_rooms[addr].add(request.room)
                        wake = True
                    continue
                found[request.room] = self._target(addr, state, dp)
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
        if cached is not None:
            return cached
        info = state.info
        assert info is not None
        if not 0 <= dp < info["sizes"]["dp_size"]:
            dp_size = info["sizes"]["dp_size"]
            return f"prefill DP rank {dp} out of range for {addr} (dp_size {dp_size})"
        ranks = {
            r["tp_rank"]: r
            for r in info["ranks"]
            if r["dp_rank"] == dp and r["cp_rank"] == AUTHORITATIVE_CP_RANK and r["pp_rank"] == 0
        }
        prefill_tp = info["sizes"]["tp_size"]
        try:
            all_routes = routes(
                prefill_tp,
                self.decode_tp,
                info["page_bytes"],
                self.expectation.page_bytes,
                info["kv_layout"],
            )
        except ConfigError as exc:
            target: PrefillTarget | str = f"prefill {addr} cannot feed this decode: {exc}"
            state.targets[dp] = target
            return target
        sources = sources_of(self.decode_rank, all_routes)
        contacts = []
        for p in range(prefill_tp):
            out = targets_of(p, all_routes)
            key = f"{addr}/dp{dp}/tp{p}"
            mine = [r for r in out if r.decode == self.decode_rank]
            if mine:
                contacts.append(Contact(key, ranks[p]["control"], len(out), mine[0]))
            elif not out and p % self.decode_tp == self.decode_rank:
                contacts.append(Contact(key, ranks[p]["control"], 1, None))  # takes part only
        target = PrefillTarget(
            peers=tuple(ranks[r.prefill]["endpoint"] for r in sources),
            controls=tuple(f"{addr}/dp{dp}/tp{r.prefill}" for r in sources),
            plan=tuple(contacts),
            bootstrap_addr=addr,
        )
        state.targets[dp] = target
        return target

    # -- background thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        next_health = time.monotonic() + self.config.heartbeat_interval
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                pending = [
                    (a, s)
                    for a, s in self._addresses.items()
                    if s.info is None and s.failure is None and s.next_try <= now
                ]
                queries = {a: sorted(r) for a, r in self._wanted_rooms.items() if r}
            for addr, state in pending:
                self._fetch_info(addr, state)
            for addr, rooms in queries.items():
                self._query_rooms(addr, rooms)
            if now >= next_health:
                next_health = now + self.config.heartbeat_interval
                self._check_health()

    def _fetch_info(self, addr: str, state: _Address) -> None:
        try:
            info = self.client.info(addr)
            check_compatible(info, self.expectation)
        except ConfigError as exc:
            with self._lock:
                state.failure = f"prefill {addr} refused: {exc}"
            log.error(state.failure)
            return
        except BootstrapError as exc:
            with self._lock:
                state.attempts += 1
                if state.attempts >= self.config.bootstrap_max_attempts:
                    state.failure = (
                        f"prefill bootstrap {addr} not usable after "
                        f"{state.attempts} attempts: {exc}"
                    )
                    log.error(state.failure)
                else:  # back off: limited in rate as well as in count
                    state.next_try = time.monotonic() + min(0.1 * 2**state.attempts, 5.0)
            return
        with self._lock:
            state.info = info
            state.attempts = 0

    def _query_rooms(self, addr: str, rooms: list[int]) -> None:
        try:
            answer = self.client.query_rooms(addr, rooms)
        except BootstrapError as exc:
            answer = {}
            error = str(exc)
        else:
            error = "prefill has no DP rank registered for it"
        with self._lock:
            for room in rooms:
                dp = answer.get(room)
                if dp is not None:
                    self._room_dp[room] = dp
                    self._wanted_rooms[addr].discard(room)
                    continue
                attempts = self._room_attempts[room] = self._room_attempts.get(room, 0) + 1
                if attempts >= self.config.bootstrap_max_attempts:
                    self._room_failures[room] = (
                        f"DP rank of room {room} unknown at {addr} "
                        f"after {attempts} queries: {error}"
                    )
                    self._wanted_rooms[addr].discard(room)
        time.sleep(0.02)  # rate limit per batch of queries

    def _check_health(self) -> None:
        with self._lock:
            addresses = [a for a, s in self._addresses.items() if s.info is not None]
        for addr in addresses:
            alive = self.client.health(addr)
            with self._lock:
                state = self._addresses[addr]
                state.misses = 0 if alive else state.misses + 1
                lost = state.misses == self.config.heartbeat_max_misses
                if lost:
                    state.failure = f"lost connection to prefill {addr}"
            if lost:
                log.error(
                    "lost connection to prefill %s after %d missed health checks",
                    addr,
                    self.config.heartbeat_max_misses,
                )
                if self.on_lost is not None:
                    self.on_lost(addr, f"lost connection to prefill {addr}")

    def forget_room(self, room: int) -> None:
        with self._lock:
            self._room_dp.pop(room, None)
            self._room_failures.pop(room, None)
            self._room_attempts.pop(room, None)
