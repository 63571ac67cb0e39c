"""The bootstrap server: one per prefill instance, where ranks register and decode looks up.

Routes (JSON in, JSON out; every bad request gets a 4xx with ``{"error": message}`` and
changes nothing; no input gets a 5xx):

- ``GET /health``: liveness, plus ``instance`` (random per server start) and ``generation``
  (bumped by every registration that changes the rank table); never needs the token.
- ``PUT /v1/ranks``: a prefill rank registers (parallel ranks and sizes, control and transport
  endpoints, page size, KV dtype and layout, plugin API version).
- ``GET /v1/info``: everything decode needs, with ``instance`` and ``generation``; 503 until
  every rank has registered.
- ``GET /v1/ranks/{dp}/{pp}/{cp}/{tp}``: one rank's registration.
- ``PUT /v1/rooms``: ``{"rooms": {"<room>": dp_rank}}``, which DP replica serves a room
  (entries expire ``room_ttl`` seconds later, removed by a timer task).
- ``POST /v1/rooms/query``: ``{"rooms": [room, ...]}`` -> ``{"dp_ranks": {"<room>": dp|null}}``.
- ``GET /query`` (only when the server was given an ``engine_id``): what vLLM's disaggregation
  routers (vllm-router, llm-d) ask a prefill's bootstrap port before they route to it,
  ``{"<dp_rank>": {"engine_id": ...}}`` for every registered DP rank; 503 until every rank has
  registered. It names no endpoint, so it needs no token: routers cannot send one.

With a token, every route but ``/health`` and ``/query`` needs ``Authorization: Bearer <token>``.

Limits (:class:`ServerLimits`): body size, JSON nesting depth, endpoint size, rank and room
table sizes, and an idle timeout that closes connections which send nothing (or too slowly).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
from aiohttp import web

from kvbridge.bootstrap.schema import (
    RANK_KEYS,
    SHARED_KEYS,
    SIZE_KEYS,
    BadRequest,
    json_depth,
    short,
    validate_registration,
)

log = logging.getLogger("kvbridge.bootstrap")

MAX_BODY = 1 << 20
#: Rooms in one PUT or query (not the table size: see :class:`ServerLimits`).
MAX_ROOMS = 65_536


@attrs.frozen
class ServerLimits:
    """What one bootstrap server accepts; every limit answers a clear 4xx (or 503 when full)."""

    #: Largest request body in bytes (413 above).
    max_body: int = MAX_BODY
    #: Deepest JSON nesting of a body (400 above; the parser itself stops at Python's
    #: recursion limit, so a deeper body never recurses further).
    max_json_depth: int = 32
    #: Largest transport endpoint of one rank, as compact JSON bytes (400 above).
    max_endpoint_bytes: int = 16 * 1024
    #: Most ranks in one prefill instance: dp*pp*cp*tp above this is refused (400).
    max_ranks: int = 4096
    #: Most room entries held at once (503 "room table full" above; expiry frees space).
    max_rooms: int = 1_000_000
    #: Seconds a connection may sit idle, or take to send a request, before it is closed.
    idle_timeout: float = 30.0
    #: Seconds between two sweeps of expired room entries.
    sweep_interval: float = 5.0


class BootstrapState:
    """All registrations and room assignments; mutated only after validation succeeds.

    Rooms live in insertion order with one TTL for all, so the oldest entry is always first:
    :meth:`sweep` removes expired entries from the front without scanning the rest, and a
    look-up is one dict access (an expired entry not yet swept reads as absent).
    """

    def __init__(
        self,
        room_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        limits: ServerLimits | None = None,
    ) -> None:
        self.room_ttl = room_ttl
        self.clock = clock
        self.limits = limits or ServerLimits()
        self.instance = uuid.uuid4().hex
        self.generation = 0
        self.ranks: dict[tuple[int, int, int, int], dict[str, Any]] = {}
        self.rooms: collections.OrderedDict[int, tuple[int, float]] = collections.OrderedDict()
        #: Requests that raised something unexpected (a bug, logged with its traceback).
        self.internal_errors = 0

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
                        f"{key} {short(entry[key])} conflicts with {short(first[key])} "
                        "registered by the other ranks of this prefill instance",
                        status=409,
                    )
        coords = (entry["dp_rank"], entry["pp_rank"], entry["cp_rank"], entry["tp_rank"])
        if self.ranks.get(coords) != entry:
            self.ranks[coords] = entry  # a restarted rank replaces
            self.generation += 1

    def info(self) -> dict[str, Any]:
        first = next(iter(self.ranks.values()))
        return {
            "instance": self.instance,
            "generation": self.generation,
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
            if not key.isascii() or not key.isdigit() or len(key) > 20:
                raise BadRequest(f"room {short(key)} is not a decimal integer")
            room = int(key)
            if not 0 < room < 2**64:
                raise BadRequest(f"room {room} out of range 1..2**64-1")
            if not isinstance(dp, int) or isinstance(dp, bool) or not 0 <= dp < dp_size:
                raise BadRequest(
                    f"dp_rank for room {room} must be in 0..{dp_size - 1}, got {short(dp)}"
                )
            parsed[room] = dp
        new = sum(1 for room in parsed if room not in self.rooms)
        if len(self.rooms) + new > self.limits.max_rooms:
            self.sweep(None)
            if len(self.rooms) + new > self.limits.max_rooms:
                raise BadRequest(
                    f"room table full ({len(self.rooms)} of {self.limits.max_rooms} entries); "
                    f"entries expire after {self.room_ttl:g}s, retry later",
                    status=503,
                )
        expires = self.clock() + self.room_ttl
        for room, dp in parsed.items():
            self.rooms.pop(room, None)  # re-inserted at the end: the order stays by expiry
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
        answer: dict[str, int | None] = {}
        for room in rooms:
            found = self.rooms.get(room)
            answer[str(room)] = found[0] if found is not None and found[1] >= now else None
        return answer

    def sweep(self, budget: int | None = 10_000) -> int:
        """Remove expired rooms from the front, at most ``budget`` of them; return how many."""
        now = self.clock()
        removed = 0
        while self.rooms and (budget is None or removed < budget):
            room, (_, expires) = next(iter(self.rooms.items()))
            if expires >= now:
                break
            del self.rooms[room]
            removed += 1
        return removed


STATE: web.AppKey[BootstrapState] = web.AppKey("state", BootstrapState)


def _authorized(given: str, token: str) -> bool:
    # Header bytes that are not UTF-8 arrive as surrogates: compare them as raw bytes.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode())


#: Routes anyone may call: they reveal nothing a rank or a room could be reached by.
OPEN_ROUTES = frozenset({"/health", "/query"})


def build_app(
    token: str | None = None,
    room_ttl: float = 600.0,
    limits: ServerLimits | None = None,
    engine_id: str | None = None,
) -> web.Application:
    limits = limits or ServerLimits()
    state = BootstrapState(room_ttl, limits=limits)

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            if (
                token is not None
                and request.path not in OPEN_ROUTES
                and not _authorized(request.headers.get("Authorization", ""), token)
            ):
                return web.json_response({"error": "missing or wrong bootstrap token"}, status=401)
            return await handler(request)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except web.HTTPException as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: logged with its traceback, counted in /health
            state.internal_errors += 1
            log.exception("bootstrap %s %s raised", request.method, request.rel_url)
            return web.json_response(
                {"error": f"request could not be processed ({type(exc).__name__})"}, status=400
            )

    async def body(request: web.Request) -> Any:
        try:
            raw = await asyncio.wait_for(request.read(), limits.idle_timeout)
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"body larger than {limits.max_body} bytes", status=413) from None
        except asyncio.TimeoutError:
            raise BadRequest(
                f"body not received within {limits.idle_timeout:g}s", status=408
            ) from None
        except ConnectionResetError:  # the client went away mid-body: its problem, not a bug
            raise BadRequest("the connection closed before the body was received") from None
        try:
            data = json.loads(raw)
        except RecursionError:  # the C parser stops at the interpreter's recursion limit
            raise BadRequest(f"JSON nested more than {limits.max_json_depth} deep") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not valid JSON: {short(str(exc))}") from None
        depth = json_depth(data)
        if depth > limits.max_json_depth:
            raise BadRequest(f"JSON nested {depth} deep, more than {limits.max_json_depth}")
        return data

    async def health(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "registered": len(state.ranks),
                "expected": state.expected,
                "instance": state.instance,
                "generation": state.generation,
                "rooms": len(state.rooms),
                "internal_errors": state.internal_errors,
            }
        )

    async def put_rank(request: web.Request) -> web.Response:
        entry = validate_registration(
            await body(request),
            max_ranks=limits.max_ranks,
            max_endpoint_bytes=limits.max_endpoint_bytes,
        )
        state.register(entry)
        log.info("registered prefill rank %s", {k: entry[k] for k in RANK_KEYS})
        return web.json_response(
            {
                "registered": len(state.ranks),
                "expected": state.expected,
                "instance": state.instance,
                "generation": state.generation,
            }
        )

    def incomplete() -> web.Response | None:
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
        return None

    async def info(request: web.Request) -> web.Response:
        return incomplete() or web.json_response(state.info())

    async def router_query(request: web.Request) -> web.Response:
        dp_ranks = sorted({coords[0] for coords in state.ranks})
        return incomplete() or web.json_response(
            {str(dp): {"engine_id": engine_id} for dp in dp_ranks}
        )

    async def get_rank(request: web.Request) -> web.Response:
        texts = [request.match_info[k] for k in ("dp", "pp", "cp", "tp")]
        if not all(t.isascii() and t.isdigit() and len(t) <= 6 for t in texts):
            raise BadRequest("rank coordinates must be small non-negative integers")
        key = tuple(int(t) for t in texts)
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

    async def sweeper(app: web.Application) -> AsyncIterator[None]:
        async def run() -> None:
            while True:
                await asyncio.sleep(limits.sweep_interval)
                while state.sweep() == 10_000:  # a big backlog: yield between chunks
                    await asyncio.sleep(0)

        task = asyncio.get_running_loop().create_task(run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = web.Application(middlewares=[guard], client_max_size=limits.max_body)
    app[STATE] = state
    app.cleanup_ctx.append(sweeper)
    app.router.add_get("/health", health)
    app.router.add_put("/v1/ranks", put_rank)
    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/ranks/{dp}/{pp}/{cp}/{tp}", get_rank)
    app.router.add_put("/v1/rooms", put_rooms)
    app.router.add_post("/v1/rooms/query", query_rooms)
    if engine_id is not None:
        app.router.add_get("/query", router_query)
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
        limits: ServerLimits | None = None,
        engine_id: str | None = None,
    ) -> None:
        """``engine_id``: the engine instance this server belongs to, answered on ``GET
        /query`` for vLLM's routers (no such route without it)."""
        self.host, self.port = host, port
        self.limits = limits or ServerLimits()
        self.app = build_app(token, room_ttl, self.limits, engine_id)
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
        # keepalive_timeout closes a connection that sends no complete request in time, from
        # its start as well as between requests (aiohttp's RequestHandler).
        self._runner = web.AppRunner(
            self.app, access_log=None, keepalive_timeout=self.limits.idle_timeout
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
