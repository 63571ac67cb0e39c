"""A client that sends both legs of a request at once, as llm-d's routing sidecar (Mooncake
mode) and SGLang's gateway do: the decode leg may reach its instance before, with or after
the prefill leg. What it sends is what those routers send (ENGINES.md section 5): a minted
``transfer_id`` to both, and decode params built from the prefill's ``GET /query``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from typing import Any

import aiohttp


def engine_id(bootstrap_port: int) -> str:
    """What the routers ask a prefill's bootstrap port once, before routing to it."""
    url = f"http://127.0.0.1:{bootstrap_port}/query"
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(json.load(r)["0"]["engine_id"])


def prefill_leg(body: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    out = {**body, "max_tokens": 1, "min_tokens": 1, "stream": False}
    out["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "transfer_id": transfer_id,
    }
    return out


def decode_leg(
    body: dict[str, Any], transfer_id: str, bootstrap_port: int, engine: str
) -> dict[str, Any]:
    return {
        **body,
        "kv_transfer_params": {
            "do_remote_decode": False,
            "do_remote_prefill": True,
            "transfer_id": transfer_id,
            "remote_bootstrap_addr": f"http://127.0.0.1:{bootstrap_port}",
            "remote_engine_id": engine,
        },
    }


class LegFailed(Exception):
    """One leg answered with an HTTP error, or its instance did not answer at all."""

    def __init__(self, url: str, status: int, body: str) -> None:
        super().__init__(f"{url}: HTTP {status}: {body[:500]}")
        self.url, self.status, self.body = url, status, body


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], delay: float
) -> dict[str, Any]:
    await asyncio.sleep(delay)
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            text = await r.text()
    except aiohttp.ClientError as exc:  # the instance died or went away
        raise LegFailed(url, 0, f"{type(exc).__name__}: {exc}") from exc
    if r.status != 200:
        raise LegFailed(url, r.status, text)
    return json.loads(text)  # type: ignore[no-any-return]


async def both_legs(
    prefill: str,
    decode: str,
    bootstrap_port: int,
    engine: str,
    body: dict[str, Any],
    *,
    prefill_delay: float = 0.0,
    decode_delay: float = 0.0,
    prefill_extra: dict[str, Any] | None = None,
    transfer_id: str | None = None,
    require_prefill: bool = True,
) -> dict[str, Any]:
    """Decode's answer; each leg starts after its delay, both in flight together.

    Raises :class:`LegFailed` for decode's error, else (``require_prefill``) for prefill's."""
    tid = transfer_id or f"xfer-{uuid.uuid4()}"
    first = {**prefill_leg(body, tid), **(prefill_extra or {})}
    second = decode_leg(body, tid, bootstrap_port, engine)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        done, out = await asyncio.gather(
            post(session, prefill, first, prefill_delay),
            post(session, decode, second, decode_delay),
            return_exceptions=True,
        )
    if isinstance(out, BaseException):
        raise out
    if require_prefill and isinstance(done, BaseException):
        raise done
    return out
