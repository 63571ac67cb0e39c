"""ZMQ transport of control messages: one PULL socket per rank, PUSH sockets to peers.

Received frames are taken off the socket by the scheduler thread at the start of every step
(:meth:`ControlReceiver.drain`): the sessions read their messages only in a step anyway, so
the message is seen no later than before, and no thread has to wake per frame to hand it over
(on a host with few cores each such wake costs tens of microseconds and a GIL hand-off). A
background thread drains only when nobody has for ``idle_drain`` seconds (an engine that
stopped stepping), so the socket never backs up and rejected frames are still counted.

Sends happen on the caller's thread through non-blocking PUSH sockets; ZMQ connects lazily,
so sending never waits for a peer. A node puts what a step sends into an :class:`Outbox`,
which sends it at the end of the step: one frame per peer for each run of batchable messages
(every ``Metadata``, ``Status`` or ``AbortAck`` of the step to that peer), in the order they
were put.
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
from kvbridge.protocol.messages import (
    MAX_BATCH,
    MalformedFrame,
    Message,
    batchable,
    decode_all,
    encode,
    encode_batch,
    sender_of,
)
from kvbridge.ratelimit import ThrottledWarning

log = logging.getLogger("kvbridge.control")
#: The background thread drains the socket when its owner has not for this long (seconds).
_IDLE_DRAIN_S = 0.05
_MAX_FRAME = 64 << 20
#: A batch frame is closed past this many bytes (well inside what a receiver accepts), ...
_BATCH_BYTES = 8 << 20
#: ... counting each message as this much plus its pages and reason.
_WIRE_BYTES = 64


def _now_ms() -> int:
    return int(time.time() * 1000)


class ControlReceiver:
    """Binds ``tcp://host:*`` and delivers every well-formed message to ``on_message``.

    With ``key`` (derived from the shared secret) only frames sealed for this receiver's
    advertised address count; everything else is dropped and counted in ``rejected``.
    ``advertise`` is the host peers connect to when it differs from the bind host.

    ``on_message`` runs on whichever thread drains: the owner's (:meth:`drain`) or, after
    ``idle_drain`` seconds without one, the receiver's own background thread.
    """

    def __init__(
        self,
        on_message: Callable[[Message], None],
        host: str = "127.0.0.1",
        *,
        key: bytes | None = None,
        advertise: str | None = None,
        idle_drain: float = _IDLE_DRAIN_S,
    ) -> None:
        if not 0 < idle_drain <= 60:
            raise ValueError(f"idle_drain must be in (0, 60] seconds, got {idle_drain!r}")
        self._context: Any = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{advertise or host}:{port}"
        self.on_message = on_message
        self._verifier = Verifier(key, self.address) if key is not None else None
        #: Messages and frames taken (a batch frame carries several messages).
        self.received = 0
        self.frames = 0
        #: Frames that did not parse (malformed, wrong version, oversized).
        self.dropped = 0
        #: Frames that failed authentication (no seal, bad MAC, replayed, stale).
        self.rejected = 0
        #: Messages whose handler raised (logged; the loop goes on).
        self.handler_errors = 0
        #: Drains that found frames, by the owner's thread and by the background thread.
        self.owner_drains = 0
        self.background_drains = 0
        # Anyone who can reach the socket can send these: logged first, then counted.
        self._warn_rejected = ThrottledWarning(log, "control frames rejected")
        self._warn_dropped = ThrottledWarning(log, "malformed control frames dropped")
        self._idle_drain = idle_drain
        # The socket is used by one thread at a time (ZMQ sockets are not thread-safe).
        self._socket_lock = threading.Lock()
        self._drained_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"kvbridge-control-{port}", daemon=True
        )
        self._thread.start()

    def drain(self) -> int:
        """Take every frame already received and hand its messages over; returns how many
        frames. Never waits: if the background thread is draining, it delivers them."""
        if not self._socket_lock.acquire(blocking=False):
            return 0
        try:
            self._drained_at = time.monotonic()
            taken = self._take_all()
            if taken:
                self.owner_drains += 1
            return taken
        finally:
            self._socket_lock.release()

    def _take_all(self) -> int:
        sock, taken = self._socket, 0
        # Asking for EVENTS costs about a microsecond; a NOBLOCK receive that finds nothing
        # raises, three times that.
        while sock.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            taken += 1
            try:
                self._handle(frames)
            except Exception:  # a drain must never fail its caller, whatever a peer sends
                self.handler_errors += 1
                log.exception("control frame handling failed on %s", self.address)
        return taken

    def _loop(self) -> None:
        while not self._stop.wait(self._idle_drain):
            with self._socket_lock:  # the warnings are updated under it too
                now = time.monotonic()
                # A summary of what was suppressed may be due, even while the owner drains.
                self._warn_rejected.flush(now)
                self._warn_dropped.flush(now)
                if now - self._drained_at < self._idle_drain:
                    continue  # the owner is draining: nothing to do
                self._drained_at = now
                if self._take_all():
                    self.background_drains += 1
        with self._socket_lock:
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
            messages = decode_all(frames)
        except MalformedFrame as exc:
            self.dropped += 1
            self._warn_dropped(
                time.monotonic(), "dropped malformed control frame on %s: %s", self.address, exc
            )
            return
        self.frames += 1
        self.received += len(messages)
        for message in messages:
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
        return self.send_frames(address, encode(message))

    def send_frames(self, address: str, parts: list[bytes]) -> bool:
        """Send one encoded frame (sealed here when a secret is configured)."""
        sock = self._sockets.get(address)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(address)
            self._sockets[address] = sock
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


class Outbox:
    """What one step sends, sent at its end; scheduler thread only.

    Per peer the messages go in the order they were put; each run of batchable messages of
    one kind and sender (:func:`~kvbridge.protocol.messages.batchable`) becomes one frame.
    """

    def __init__(self, sender: ControlSender) -> None:
        self.sender = sender
        self._queued: dict[str, list[Message]] = {}

    def put(self, address: str, message: Message) -> None:
        queued = self._queued.get(address)
        if queued is None:
            self._queued[address] = [message]
        else:
            queued.append(message)

    def flush(self) -> None:
        if not self._queued:
            return
        queued, self._queued = self._queued, {}
        for address, messages in queued.items():
            run: list[Message] = []
            size = 0
            for message in messages:
                if run and (
                    type(message) is not type(run[0])
                    or sender_of(message) != sender_of(run[0])
                    or len(run) == MAX_BATCH
                    or size > _BATCH_BYTES
                ):
                    self.sender.send_frames(address, encode_batch(run))
                    run, size = [], 0
                if batchable(message):
                    run.append(message)
                    size += _WIRE_BYTES + 8 * len(getattr(message, "pages", ()))
                    size += len(getattr(message, "reason", None) or "")
                else:
                    self.sender.send(address, message)
            if run:
                self.sender.send_frames(address, encode_batch(run))


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
