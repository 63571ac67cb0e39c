"""ZMQ transport of control messages: one PULL socket per rank, PUSH sockets to peers.

The receive loop runs on its own thread and hands decoded messages to a callback (the
sessions queue them for the scheduler thread). Sends happen on the caller's thread through
non-blocking PUSH sockets; ZMQ connects lazily, so sending never waits for a peer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from kvbridge.control.messages import MalformedFrame, Message, decode, encode

log = logging.getLogger("kvbridge.control")
_POLL_MS = 100
_MAX_FRAME = 64 << 20


class ControlReceiver:
    """Binds ``tcp://host:*`` and delivers every well-formed message to ``on_message``."""

    def __init__(self, on_message: Callable[[Message], None], host: str = "127.0.0.1") -> None:
        self._context: Any = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.on_message = on_message
        self.received = 0
        self.dropped = 0
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
                continue
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            try:
                message = decode(frames)
            except MalformedFrame as exc:
                self.dropped += 1
                log.warning("dropped malformed control frame on %s: %s", self.address, exc)
                continue
            self.received += 1
            try:
                self.on_message(message)
            except Exception:
                log.exception("control message handler failed for %r", message)
        self._socket.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class ControlSender:
    """PUSH sockets to peers' receivers, created on first use and reused."""

    def __init__(self) -> None:
        self._context: Any = zmq.Context.instance()
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
        try:
            sock.send_multipart(encode(message), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.failed += 1
            log.warning("control send to %s failed: %s", address, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
