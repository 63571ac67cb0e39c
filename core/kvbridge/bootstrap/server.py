"""The bootstrap server: one per prefill instance, where ranks register and decode looks up.

Routes (JSON in, JSON out; every bad request gets a 4xx with ``{"error": message}`` and
changes nothing):

- ``GET /health``: liveness; never needs the token.
- ``PUT /v1/ranks``: a prefill rank registers (parallel ranks and sizes, control and transport
  endpoints, page size, KV dtype and layout, plugin API version).
- ``GET /v1/info``: everything decode needs; 503 until every rank has registered.
- ``GET /v1/ranks/{dp}/{pp}/{cp}/{tp}``: one rank's registration.
- ``PUT /v1/rooms``: ``{"rooms": {"<room>": dp_rank}}``, which DP replica serves a room
  (entries expire after ``room_ttl`` seconds).
- ``POST /v1/rooms/query``: ``{"rooms": [room, ...]}`` -> ``{"dp_ranks": {"<room>": dp|null}}``.

With a token, every route but ``/health`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger("kvbridge.bootstrap")

MAX_BODY = 1 << 20
MAX_ROOMS = 65_536
SIZE_KEYS = ("dp_size", "pp_size", "cp_size", "tp_size")
RANK_KEYS = ("dp_rank", "pp_rank", "cp_rank", "tp_rank")
#: Must be identical across the ranks of one prefill instance.
SHARED_KEYS = (
    "page_bytes",
    "page_size",
    "kv_dtype",
    "kv_layout",
    "api_version",
    "transport",
    "num_kv_regions",
)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _int_field(data: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 20) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _str_field(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise BadRequest(f"{key} must be a non-empty string, got {value!r}")
    return value


def validate_registration(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRequest("registration must be a JSON object")
    entry: dict[str, Any] = {}
    for key in SIZE_KEYS:
        entry[key] = _int_field(data, key, 1, 4096)
    for key, size in zip(RANK_KEYS, SIZE_KEYS):
        entry[key] = _int_field(data, key, 0, entry[size] - 1)
    entry["page_bytes"] = _int_field(data, "page_bytes", 1, 1 << 40)
    entry["page_size"] = _int_field(data, "page_size", 1, 1 << 20)
    entry["num_kv_regions"] = _int_field(data, "num_kv_regions", 1, 1 << 20)
    for key in ("control", "kv_dtype", "kv_layout", "api_version", "transport"):
        entry[key] = _str_field(data, key)
    endpoint = data.get("endpoint")
    if not isinstance(endpoint, dict):
        raise BadRequest("endpoint must be a JSON object (the transport's endpoint)")
    entry["endpoint"] = endpoint
    entry["authoritative"] = entry["cp_rank"] == 0
    unknown = sorted(set(data) - set(entry) - {"authoritative"})
    if unknown:
        raise BadRequest(f"unknown registration field(s): {', '.join(unknown)}")
    return entry


class BootstrapState:
    """All registrations and room assignments; mutated only after validation succeeds."""

    def __init__(self, room_ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.room_ttl = room_ttl
        self.clock = clock
        self.ranks: dict[tuple[int, int, int, int], dict[str, Any]] = {}
        self.rooms: dict[int, tuple[int, float]] = {}

    @property
    def expected(self) -> int | None:
        if not self.ranks:
            return None
        first = next(iter(self.ranks.values()))
        total = 1
        for key in SIZE_KEYS:
            total *= first[key]
        return total

    def register(self, entry: dict[str, Any]) -> None:
        if self.ranks:
            first = next(iter(self.ranks.values()))
            for key in SIZE_KEYS + SHARED_KEYS:
                if first[key] != entry[key]:
                    raise BadRequest(
                        f"{key} {entry[key]!r} conflicts with {first[key]!r} registered by "
                        f"the other ranks of this prefill instance",
                        status=409,
                    )
        self.ranks[tuple(entry[k] for k in RANK_KEYS)] = entry  # a restarted rank replaces

    def info(self) -> dict[str, Any]:
        first = next(iter(self.ranks.values()))
        return {
            "sizes": {k: first[k] for k in SIZE_KEYS},
            **{k: first[k] for k in SHARED_KEYS},
            "ranks": sorted(self.ranks.values(), key=lambda e: tuple(e[k] for k in RANK_KEYS)),
        }

    def put_rooms(self, data: Any) -> int:
        rooms = data.get("rooms") if isinstance(data, dict) else None
        if not isinstance(rooms, dict) or len(rooms) > MAX_ROOMS:
            raise BadRequest(
                f'body must be {{"rooms": {{"<room>": dp_rank}}}} with at most {MAX_ROOMS} rooms'
            )
        dp_size = next(iter(self.ranks.values()))["dp_size"] if self.ranks else 4096
        parsed = {}
        for key, dp in rooms.items():
            try:
                room = int(key)
            except ValueError:
                raise BadRequest(f"room {key!r} is not an integer") from None
            if not 0 < room < 2**64:
                raise BadRequest(f"room {room} out of range 1..2**64-1")
            if not isinstance(dp, int) or isinstance(dp, bool) or not 0 <= dp < dp_size:
                raise BadRequest(f"dp_rank for room {room} must be in 0..{dp_size - 1}, got {dp!r}")
            parsed[room] = dp
        expires = self.clock() + self.room_ttl
        for room, dp in parsed.items():
            self.rooms[room] = (dp, expires)
        return len(parsed)

    def query_rooms(self, data: Any) -> dict[str, int | None]:
        rooms = data.get("rooms") if isinstance(data, dict) else None
        if (
            not isinstance(rooms, list)
            or len(rooms) > MAX_ROOMS
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in rooms)
        ):
            raise BadRequest(
                f'body must be {{"rooms": [room, ...]}} with at most {MAX_ROOMS} integer rooms'
            )
        now = self.clock()
        for room, (_, expires) in list(self.rooms.items()):
            if expires < now:
                del self.rooms[room]
        return {str(r): (self.rooms[r][0] if r in self.rooms else None) for r in rooms}


STATE: web.AppKey[BootstrapState] = web.AppKey("state", BootstrapState)


def build_app(token: str | None = None, room_ttl: float = 600.0) -> web.Application:
    state = BootstrapState(room_ttl)

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if token is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response({"error": "missing or wrong bootstrap token"}, status=401)
        try:
            return await handler(request)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except web.HTTPException as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)

    async def body(request: web.Request) -> Any:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"body larger than {MAX_BODY} bytes", status=413) from None
        try:
            import json

            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None

    async def health(request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "registered": len(state.ranks), "expected": state.expected}
        )

    async def put_rank(request: web.Request) -> web.Response:
        entry = validate_registration(await body(request))
        state.register(entry)
        log.info("registered prefill rank %s", {k: entry[k] for k in RANK_KEYS})
        return web.json_response({"registered": len(state.ranks), "expected": state.expected})

    async def info(request: web.Request) -> web.Response:
        expected = state.expected
        if expected is None or len(state.ranks) < expected:
            return web.json_response(
                {
                    "error": "waiting for prefill ranks to register",
                    "registered": len(state.ranks),
                    "expected": expected,
                },
                status=503,
            )
        return web.json_response(state.info())

    async def get_rank(request: web.Request) -> web.Response:
        try:
            key = tuple(int(request.match_info[k]) for k in ("dp", "pp", "cp", "tp"))
        except ValueError:
            raise BadRequest("rank coordinates must be integers") from None
        entry = state.ranks.get(key)  # type: ignore[arg-type]
        if entry is None:
            return web.json_response(
                {"error": f"no rank registered at dp/pp/cp/tp {key}"}, status=404
            )
        return web.json_response(entry)

    async def put_rooms(request: web.Request) -> web.Response:
        return web.json_response({"stored": state.put_rooms(await body(request))})

    async def query_rooms(request: web.Request) -> web.Response:
        return web.json_response({"dp_ranks": state.query_rooms(await body(request))})

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_put("/v1/ranks", put_rank)
    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/ranks/{dp}/{pp}/{cp}/{tp}", get_rank)
    app.router.add_put("/v1/rooms", put_rooms)
    app.router.add_post("/v1/rooms/query", query_rooms)
    return app


class BootstrapServer:
    """Runs the app on its own thread and event loop (inside a prefill process or alone)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        room_ttl: float = 600.0,
    ) -> None:
        self.host, self.port = host, port
        self.app = build_app(token, room_ttl)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvbridge-bootstrap", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def state(self) -> BootstrapState:
        return self.app[STATE]

    def start(self) -> BootstrapServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise OSError(
                f"bootstrap server could not listen on {self.host}:{self.port}: {self._error}"
            )
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
        self._loop.close()

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
