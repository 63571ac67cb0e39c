"""The bootstrap client: blocking HTTP requests to a bootstrap server (stdlib only).

Every answer is untrusted input (rule 9): sizes are bounded and malformed answers raise
:class:`BootstrapError`, which says whether retrying may help.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from kvbridge.config import TransferConfig
from kvbridge.errors import KVBridgeError

#: Largest answer read from a bootstrap server (4096 ranks with 16 KiB endpoints fit).
MAX_ANSWER = 128 << 20
#: First pause of a back-off; it doubles per failure up to ``bootstrap_backoff_max``.
BACKOFF_START = 0.05


def backoff(failures: int, ceiling: float) -> float:
    """Pause after ``failures`` failures in a row: doubling from 50 ms, capped, +-20% jitter."""
    base = min(ceiling, BACKOFF_START * 2 ** min(max(failures - 1, 0), 30))
    return base * random.uniform(0.8, 1.2)


class BootstrapError(KVBridgeError):
    """A bootstrap request failed; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth retrying until a deadline: no answer, starting (503) or a server error."""
        return self.status is None or self.status >= 500


class BootstrapNotReady(BootstrapError):
    """503: the prefill instance is starting (not every rank registered yet)."""


class BootstrapUnreachable(BootstrapError):
    """No answer: refused, reset, timed out."""


def split_address(addr: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> ``(host, port)``; BootstrapError if malformed."""
    try:
        parts = urllib.parse.urlsplit(f"http://{addr}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None or port == 0 or parts.path or parts.query or parts.username:
        raise BootstrapError(f"bootstrap address {addr!r} is not host:port", status=400)
    return host, port


class BootstrapClient:
    """Blocking requests to bootstrap servers; ``timeout`` bounds each one.

    It opens one connection per request and closes it, so it holds no socket between
    requests. What a prefill keeps registered across server restarts is
    :class:`~kvbridge.bootstrap.registration.PrefillRegistration`'s.
    """

    def __init__(self, token: str | None = None, timeout: float = 2.0) -> None:
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_config(cls, config: TransferConfig) -> BootstrapClient:
        return cls(config.bootstrap_token, config.bootstrap_http_timeout)

    def request(self, method: str, addr: str, path: str, body: Any = None) -> Any:
        host, port = split_address(addr)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Connection": "close"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_ANSWER + 1)
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            raise BootstrapUnreachable(f"bootstrap {addr} unreachable: {exc}") from None
        finally:
            conn.close()  # one connection per request: nothing stays open between requests
        if len(raw) > MAX_ANSWER:
            raise BootstrapError(f"bootstrap {addr}{path} answered more than {MAX_ANSWER} bytes")
        try:
            answer = json.loads(raw or b"null")
        except (ValueError, RecursionError):
            answer = None
            if status < 300:
                raise BootstrapError(f"bootstrap {addr}{path} answered invalid JSON") from None
        if status < 300:
            return answer
        message = answer.get("error") if isinstance(answer, dict) else None
        message = str(message)[:300] if message else http.client.responses.get(status, "")
        if status == 503:
            raise BootstrapNotReady(f"{addr}: {message}", status)
        raise BootstrapError(f"bootstrap {addr}{path} answered {status}: {message}", status)

    def register_rank(
        self, addr: str, entry: Mapping[str, Any], *, attempts: int = 50, interval: float = 0.1
    ) -> Any:
        """Register a prefill rank, retrying while the server is unreachable; raises
        :class:`BootstrapUnreachable` after ``attempts``, and on definitive errors (a
        conflicting or invalid registration) at once."""
        for attempt in range(attempts):
            try:
                return self.request("PUT", addr, "/v1/ranks", dict(entry))
            except BootstrapUnreachable:
                if attempt == attempts - 1:
                    raise
                time.sleep(interval)
        raise AssertionError("unreachable")

    def put_rooms(self, addr: str, dp_ranks: Mapping[int, int]) -> None:
        self.request("PUT", addr, "/v1/rooms", {"rooms": {str(k): v for k, v in dp_ranks.items()}})

    def info(self, addr: str) -> dict[str, Any]:
        answer = self.request("GET", addr, "/v1/info")
        if not isinstance(answer, dict) or not isinstance(answer.get("ranks"), list):
            raise BootstrapError(f"bootstrap {addr}/v1/info answered no rank list")
        return answer

    def query_rooms(self, addr: str, rooms: Sequence[int]) -> dict[int, int | None]:
        answer = self.request("POST", addr, "/v1/rooms/query", {"rooms": list(rooms)})
        try:
            return {int(k): v for k, v in answer["dp_ranks"].items()}
        except (TypeError, KeyError, AttributeError, ValueError):
            raise BootstrapError(f"bootstrap {addr} answered a malformed room query") from None

    def status(self, addr: str) -> dict[str, Any]:
        """``/health``'s answer (``instance``, ``generation``, ...); raises if no answer."""
        answer = self.request("GET", addr, "/health")
        if not isinstance(answer, dict):
            raise BootstrapError(f"bootstrap {addr}/health answered no object")
        return answer

    def health(self, addr: str) -> bool:
        try:
            self.status(addr)
            return True
        except BootstrapError:
            return False
