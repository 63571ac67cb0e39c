"""ZMQ transport of control messages: one PULL socket per rank, PUSH sockets to peers.

The receive loop runs on its own thread and hands decoded messages to a callback (the
sessions queue them for the scheduler thread). Sends happen on the caller's thread through
non-blocking PUSH sockets; ZMQ connects lazily, so sending never waits for a peer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from kvbridge.config import TransferConfig
from kvbridge.protocol.auth import AuthError, Sealer, Verifier
from kvbridge.protocol.messages import MalformedFrame, Message, decode, encode
from kvbridge.ratelimit import ThrottledWarning

log = logging.getLogger("kvbridge.control")
_POLL_MS = 100
_MAX_FRAME = 64 << 20


def _now_ms() -> int:
    return int(time.time() * 1000)


class ControlReceiver:
    """Binds ``tcp://host:*`` and delivers every well-formed message to ``on_message``.

    With ``key`` (derived from the shared secret) only frames sealed for this receiver's
    advertised address count; everything else is dropped and counted in ``rejected``.
    ``advertise`` is the host peers connect to when it differs from the bind host.
    """

    def __init__(
        self,
        on_message: Callable[[Message], None],
        host: str = "127.0.0.1",
        *,
        key: bytes | None = None,
        advertise: str | None = None,
    ) -> None:
        self._context: Any = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{advertise or host}:{port}"
        self.on_message = on_message
        self._verifier = Verifier(key, self.address) if key is not None else None
        self.received = 0
        #: Frames that did not parse (malformed, wrong version, oversized).
        self.dropped = 0
        #: Frames that failed authentication (no seal, bad MAC, replayed, stale).
        self.rejected = 0
        #: Messages whose handler raised (logged; the loop goes on).
        self.handler_errors = 0
        # Anyone who can reach the socket can send these: logged first, then counted.
        self._warn_rejected = ThrottledWarning(log, "control frames rejected")
        self._warn_dropped = ThrottledWarning(log, "malformed control frames dropped")
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"kvbridge-control-{port}", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(_POLL_MS):
                now = time.monotonic()  # quiet: a summary of what was suppressed may be due
                self._warn_rejected.flush(now)
                self._warn_dropped.flush(now)
                continue
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            try:
                self._handle(frames)
            except Exception:  # the receive thread must never die, whatever a peer sends
                self.handler_errors += 1
                log.exception("control frame handling failed on %s", self.address)
        self._socket.close(linger=0)

    def _handle(self, frames: list[bytes]) -> None:
        if self._verifier is not None:
            try:
                frames = self._verifier.open(frames, _now_ms())
            except AuthError as exc:
                self.rejected += 1
                self._warn_rejected(
                    time.monotonic(), "rejected control frame on %s: %s", self.address, exc
                )
                return
        try:
            message = decode(frames)
        except MalformedFrame as exc:
            self.dropped += 1
            self._warn_dropped(
                time.monotonic(), "dropped malformed control frame on %s: %s", self.address, exc
            )
            return
        self.received += 1
        self.on_message(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class ControlSender:
    """PUSH sockets to peers' receivers, created on first use and reused."""

    def __init__(self, key: bytes | None = None) -> None:
        self._context: Any = zmq.Context.instance()
        self._sealer = Sealer(key) if key is not None else None
        self._sockets: dict[str, zmq.Socket] = {}
        self.sent = 0
        self.failed = 0

    def send(self, address: str, message: Message) -> bool:
        sock = self._sockets.get(address)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(address)
            self._sockets[address] = sock
        parts = encode(message)
        if self._sealer is not None:
            parts.append(self._sealer.seal(address, parts, _now_ms()))
        try:
            sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.failed += 1
            log.warning("control send to %s failed: %s", address, exc)
            return False
        self.sent += 1
        return True

    def forget(self, address: str) -> None:
        """Close the socket to a peer that is gone (its address will not be used again)."""
        sock = self._sockets.pop(address, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def control_key(config: TransferConfig) -> bytes | None:
    """The key that seals control frames, derived from the shared secret (None: no secret)."""
    return config.secret.derive("control") if config.secret is not None else None


def control_receiver(
    on_message: Callable[[Message], None],
    config: TransferConfig,
    host: str | None,
    key: bytes | None,
) -> ControlReceiver:
    """Bind ``host`` (default ``config.bind_host``); advertise ``config.advertise_host``, else
    the bound host."""
    bind = config.bind_host if host is None else host
    advertise = config.advertise_host or bind
    return ControlReceiver(on_message, bind, key=key, advertise=advertise)
