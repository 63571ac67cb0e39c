"""Messages for rooms a prefill rank has not been given yet, bounded.

Decode may hear of a request before this prefill rank does (a router that dispatches to both
sides at once, a long queue before the forward pass): its metadata or abort waits here until
``add`` brings the room, or for ``ttl`` seconds. Every byte from the network is untrusted
(rule 9), and without a shared secret anyone may send such messages, so the store is bounded:

* one message per (kind, sender) and room, and at most :data:`MAX_EVENTS_PER_ROOM` per room;
* at most ``capacity`` rooms: a new room past it evicts the oldest room of the sender that
  brought it when that sender holds its fair share or more (a flood evicts its own rooms),
  else the oldest room of all. Evictions are counted.

The session decides who may be kept at all (only registered decode ranks). Pure: no clock,
no logging; the caller passes the time and reports what comes back.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

#: Rooms waiting for ``add`` on one prefill rank. A decode rank sends metadata only for rooms
#: it holds memory for, so legitimate early rooms are far fewer.
MAX_EARLY_ROOMS = 16_384
#: Messages kept for one room: metadata and an abort from each decode rank that writes it.
MAX_EVENTS_PER_ROOM = 256


class EarlyMessages:
    def __init__(self, ttl: float, capacity: int = MAX_EARLY_ROOMS) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.ttl = ttl
        self.capacity = capacity
        #: Rooms dropped to stay within ``capacity``.
        self.evicted = 0
        #: Messages dropped because their room already held :data:`MAX_EVENTS_PER_ROOM`.
        self.overflowed = 0
        # Insertion order is arrival order, so the front is the oldest.
        self._rooms: dict[int, tuple[float, Hashable, dict[Hashable, tuple[str, Any]]]] = {}
        self._of_sender: dict[Hashable, dict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, room: int) -> bool:
        return room in self._rooms

    def __iter__(self) -> Iterator[int]:
        """The rooms with messages kept, oldest first."""
        return iter(self._rooms)

    def keep(self, room: int, sender: Hashable, kind: str, payload: Any, now: float) -> int | None:
        """Keep one message; returns the room evicted to make space for it, if any.

        A second message of the same kind from the same sender for the same room is dropped:
        the first one is what counts once the room arrives.
        """
        entry = self._rooms.get(room)
        if entry is not None:
            events = entry[2]
            if (kind, sender) in events:
                return None
            if len(events) >= MAX_EVENTS_PER_ROOM:
                self.overflowed += 1
                return None
            events[(kind, sender)] = (kind, payload)
            return None
        evicted = self._evict_for(sender) if len(self._rooms) >= self.capacity else None
        self._rooms[room] = (now, sender, {(kind, sender): (kind, payload)})
        self._of_sender.setdefault(sender, {})[room] = None
        return evicted

    def pop(self, room: int) -> list[tuple[str, Any]]:
        """The messages kept for ``room``, in arrival order (none: an empty list)."""
        entry = self._rooms.pop(room, None)
        if entry is None:
            return []
        self._unlink(room, entry[1])
        return list(entry[2].values())

    def expire(self, now: float) -> list[int]:
        """Drop and return the rooms kept for longer than ``ttl``."""
        limit = now - self.ttl
        gone = []
        for room, (t, _, _) in self._rooms.items():
            if t >= limit:
                break
            gone.append(room)
        for room in gone:
            self._unlink(room, self._rooms.pop(room)[1])
        return gone

    def messages(self) -> Iterator[tuple[str, Any]]:
        for _, _, events in self._rooms.values():
            yield from events.values()

    def _evict_for(self, sender: Hashable) -> int:
        own = self._of_sender.get(sender)
        if own and len(own) >= self.capacity // len(self._of_sender):
            room = next(iter(own))
        else:
            room = next(iter(self._rooms))
        self._unlink(room, self._rooms.pop(room)[1])
        self.evicted += 1
        return room

    def _unlink(self, room: int, sender: Hashable) -> None:
        own = self._of_sender[sender]
        del own[room]
        if not own:
            del self._of_sender[sender]
