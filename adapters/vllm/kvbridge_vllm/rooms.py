"""Router transfer ids -> kvbridge rooms.

vLLM's disaggregated proxies allocate a ``transfer_id`` (a string) per request and give it to
both instances. Both sides derive the room from it on their own, with the same stable hash,
so no room travels between them. Rooms are 64-bit and never 0.

Collisions: two *live* requests of one instance whose transfer ids map to one room (a router
reusing an id, or a 2**-64 hash collision). The second is refused, never merged: on prefill
its KV is not offered (the response carries no ``kv_transfer_params``, so a proxy sends the
request to decode as a plain one), on decode it is computed locally (no transfer). Both are
logged with both request ids. Deterministic re-hashing was rejected: both sides would have to
see the same set of live ids to re-hash the same way, and they do not.
"""

from __future__ import annotations

import hashlib

_PERSON = b"kvbridge-vllm"


def room_of(transfer_id: str) -> int:
    """The room for ``transfer_id``: blake2b-64 of its UTF-8 bytes, in 1..2**64-1."""
    if not isinstance(transfer_id, str) or not transfer_id:
        raise ValueError(f"transfer_id must be a non-empty string, got {transfer_id!r}")
    # surrogatepass: the id comes from a client's JSON, which may hold a lone surrogate
    # ("\ud800"); strict UTF-8 would raise on vLLM's scheduler thread instead of naming a room.
    data = transfer_id.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(data, digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "little") % (2**64 - 1) + 1


class RoomCollision(ValueError):
    """A room already held by another live request of this instance."""


class RoomTable:
    """Which live request holds each room (one instance, scheduler process)."""

    def __init__(self) -> None:
        self._owner: dict[int, str] = {}
        self._room: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, room: int) -> str | None:
        return self._owner.get(room)

    def room(self, request_id: str) -> int | None:
        return self._room.get(request_id)

    def check(self, transfer_id: str, request_id: str) -> int:
        """The room for ``transfer_id``; raises :class:`RoomCollision` if another live
        request holds it. Changes nothing."""
        room = room_of(transfer_id)
        owner = self._owner.get(room)
        if owner is not None and owner != request_id:
            raise RoomCollision(
                f"transfer_id {transfer_id!r} of request {request_id} maps to room {room}, "
                f"which live request {owner} holds (a reused transfer_id?); refused"
            )
        return room

    def claim(self, transfer_id: str, request_id: str) -> int:
        room = self.check(transfer_id, request_id)
        self._owner[room] = request_id
        self._room[request_id] = room
        return room

    def release(self, request_id: str) -> int | None:
        room = self._room.pop(request_id, None)
        if room is not None and self._owner.get(room) == request_id:
            del self._owner[room]
        return room
