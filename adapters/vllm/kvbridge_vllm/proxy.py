"""A small disaggregation proxy for vLLM's OpenAI completions API (demo and tests).

``python -m kvbridge_vllm.proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
--port 8000``

For each ``POST /v1/completions`` (and ``/v1/chat/completions``) it allocates a transfer id,
sends the request to prefill with ``max_tokens=1`` and ``kv_transfer_params =
{"do_remote_decode": true, "transfer_id": ...}``, then sends the original request to decode
with the ``kv_transfer_params`` prefill returned (the flow of vLLM's own disaggregated proxies;
the params are MooncakeConnector-compatible). A prefill that returns no params (it refused to
offer its KV) makes the decode request an ordinary one. Streaming responses are passed through.
A client that goes away cancels the upstream requests (vLLM then aborts them).
Several ``--prefill``/``--decode`` URLs are used round-robin.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import uuid
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("kvbridge_vllm.proxy")


def prefill_body(body: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "transfer_id": transfer_id,
    }
    return out


def decode_body(body: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(body)
    if params:
        out["kv_transfer_params"] = params
    else:
        out.pop("kv_transfer_params", None)
    return out


class Proxy:
    def __init__(self, prefill: list[str], decode: list[str], timeout: float = 600.0) -> None:
        self._prefill = itertools.cycle([u.rstrip("/") for u in prefill])
        self._decode = itertools.cycle([u.rstrip("/") for u in decode])
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=self.timeout)

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body is not a JSON object")
        path = request.path
        transfer_id = f"kvb-{uuid.uuid4().hex}"
        prefill_url = next(self._prefill) + path
        decode_url = next(self._decode) + path
        try:
            return await self._forward(request, body, transfer_id, prefill_url, decode_url)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # An instance gone (killed, restarting) or too slow: the client gets a clear 502.
            log.warning("%s %s: %s: %s", path, transfer_id, type(exc).__name__, exc)
            return _error(502, f"upstream failed: {type(exc).__name__}: {exc}")

    async def _forward(
        self,
        request: web.Request,
        body: dict[str, Any],
        transfer_id: str,
        prefill_url: str,
        decode_url: str,
    ) -> web.StreamResponse:
        assert self.session is not None
        async with self.session.post(prefill_url, json=prefill_body(body, transfer_id)) as resp:
            if resp.status != 200:
                text = await resp.text()
                return web.Response(status=resp.status, text=text, content_type="application/json")
            first = await resp.json()
        params = first.get("kv_transfer_params")
        if not params:
            log.warning("prefill %s returned no kv_transfer_params: decoding locally", prefill_url)
        async with self.session.post(decode_url, json=decode_body(body, params)) as resp:
            if not body.get("stream"):
                data = await resp.read()
                return web.Response(status=resp.status, body=data, content_type="application/json")
            out = web.StreamResponse(status=resp.status)
            out.content_type = resp.headers.get("Content-Type", "text/event-stream")
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # Headers are out: all that is left to say is that the stream ends early.
                log.warning("decode stream %s broke: %s: %s", transfer_id, type(exc).__name__, exc)
            await out.write_eof()
            return out


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", action="append", required=True, help="prefill base URL")
    parser.add_argument("--decode", action="append", required=True, help="decode base URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    proxy = Proxy(args.prefill, args.decode, args.timeout)
    print(json.dumps({"proxy": f"http://{args.host}:{args.port}"}), flush=True)
    # handler_cancellation: a client that goes away cancels the upstream requests too.
    web.run_app(proxy.app(), host=args.host, port=args.port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
