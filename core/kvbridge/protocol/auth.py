"""Authenticated control frames (pure: no sockets, no clock of its own).

With a shared secret configured, every frame carries a seal as its last part::

    sender id (16 bytes) | counter (8) | timestamp ms (8) | HMAC-SHA256 (32)

The MAC covers the destination address, every other part (length-prefixed) and the first three
fields of the seal. So a frame is valid for one receiver only, cannot be altered, and cannot be
replayed: a receiver accepts a sender's counter only if it is higher than the last one it saw
from that sender, and only within :data:`REPLAY_WINDOW_S` of its own clock (which is what lets
it forget senders it has not heard from for longer than that).

Why a MAC and not ZMQ CURVE: every rank already shares one secret (the bootstrap token comes
from it), a MAC needs no key pairs to generate, distribute and pin per rank, it works the same
over any socket type, and the frames carry nothing confidential (page indices and room ids).
HMAC-SHA256 of a small frame costs a few microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence

SEAL_BYTES = 16 + 8 + 8 + 32
#: A frame whose timestamp is further than this from the receiver's clock is refused.
REPLAY_WINDOW_S = 120.0
_MAX_SENDERS = 65536
_FIELDS = struct.Struct("<16sQQ")


class AuthError(ValueError):
    """A frame failed authentication (missing, wrong, replayed or stale seal)."""


def _mac(key: bytes, destination: str, parts: Sequence[bytes], fields: bytes) -> bytes:
    h = hmac.new(key, destination.encode(), hashlib.sha256)
    for part in parts:
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    h.update(fields)
    return h.digest()


class Sealer:
    """The sending half: one per sending socket owner (one sender id, one counter)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.sender = os.urandom(16)
        self._counter = 0

    def seal(self, destination: str, parts: Sequence[bytes], now_ms: int) -> bytes:
        self._counter += 1
        fields = _FIELDS.pack(self.sender, self._counter, now_ms)
        return fields + _mac(self._key, destination, parts, fields)


class Verifier:
    """The receiving half for one receiver address; remembers each sender's last counter."""

    def __init__(self, key: bytes, destination: str) -> None:
        self._key = key
        self.destination = destination
        self._last: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # sender -> (ctr, ms)

    def open(self, frames: Sequence[bytes], now_ms: int) -> list[bytes]:
        """Check the seal (the last part) and return the other parts, or raise AuthError."""
        if len(frames) < 2 or len(frames[-1]) != SEAL_BYTES:
            raise AuthError("frame is not authenticated (a shared secret is configured here)")
        parts, seal = list(frames[:-1]), frames[-1]
        fields, mac = seal[: _FIELDS.size], seal[_FIELDS.size :]
        if not hmac.compare_digest(mac, _mac(self._key, self.destination, parts, fields)):
            raise AuthError("bad frame MAC (wrong secret, altered frame or another receiver's)")
        sender, counter, sent_ms = _FIELDS.unpack(fields)
        if abs(now_ms - sent_ms) > REPLAY_WINDOW_S * 1000:
            raise AuthError(
                f"frame timestamp is {abs(now_ms - sent_ms) / 1000:.0f}s away from this clock "
                f"(limit {REPLAY_WINDOW_S:g}s): replayed, or the hosts' clocks disagree"
            )
        last = self._last.get(sender)
        if last is not None and counter <= last[0]:
            raise AuthError(f"replayed frame (counter {counter}, already saw {last[0]})")
        self._last[sender] = (counter, now_ms)
        self._last.move_to_end(sender)
        self._forget_old(now_ms)
        return parts

    def _forget_old(self, now_ms: int) -> None:
        # A sender silent for longer than the window can only present frames the timestamp
        # check refuses anyway, so its counter no longer needs remembering.
        limit = now_ms - REPLAY_WINDOW_S * 1000
        while self._last:
            sender, (_, seen) = next(iter(self._last.items()))
            if seen >= limit and len(self._last) <= _MAX_SENDERS:
                break
            del self._last[sender]
