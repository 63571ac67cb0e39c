"""One request's state as SGLang's sender and receiver objects see it, and room validation.

``bootstrap_room`` comes from the router (or any HTTP client) in the request body: untrusted.
It is kvbridge's room, so it must be a positive 63-bit integer; anything else fails that one
request with a message saying so, before it reaches kvbridge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import numpy as np

from kvbridge import KVPoll

MAX_ROOM = 2**63 - 1
#: The bootstrap address of a request that came without ``bootstrap_host`` (see plugin.py).
NO_BOOTSTRAP_HOST = "<no bootstrap_host>:0"


def address_problem(bootstrap_addr: str) -> str | None:
    """Why a request's bootstrap address cannot name a prefill, or None."""
    host, _, port = bootstrap_addr.rpartition(":")
    if bootstrap_addr == NO_BOOTSTRAP_HOST or host in ("", "None"):
        return (
            "the request has no bootstrap_host: the router (or client) must send "
            "bootstrap_host, bootstrap_port and bootstrap_room together"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"bootstrap_port in {bootstrap_addr!r} is not a port number"
    return None


class RoomError(ValueError):
    """A request's ``bootstrap_room`` cannot be a kvbridge room."""


class TransferFailed(Exception):
    """What ``failure_exception()`` raises: SGLang logs it and returns it to the client.

    ``is_from_another_rank`` and ``failure_reason`` are the attributes SGLang's queues read:
    an echo of another rank's failure is logged at debug level, the root cause once.
    """

    def __init__(self, reason: str, *, from_other_rank: bool = False) -> None:
        super().__init__(reason)
        self.failure_reason = reason
        self.is_from_another_rank = from_other_rank


def check_room(room: Any) -> int:
    if isinstance(room, bool) or not isinstance(room, (int, np.integer)):
        raise RoomError(
            f"bootstrap_room must be an integer in 1..2**63-1, got {type(room).__name__} "
            f"{room!r}: the router (or client) sends it with bootstrap_host and bootstrap_port"
        )
    value = int(room)
    if not 0 < value <= MAX_ROOM:
        raise RoomError(f"bootstrap_room must be in 1..2**63-1, got {value}")
    return value


@attrs.define
class RoomState:
    room: int
    bootstrap_addr: str
    status: KVPoll = KVPoll.Bootstrapping
    reason: str | None = None
    from_other_rank: bool = False
    prefill_dp_rank: int | None = None
    metadata_sent: bool = False
    aux_index: int = -1
    #: Decode: the committed metadata rows, copied into SGLang's slot by the next poll().
    committed_row: np.ndarray | None = None

    def fail(self, reason: str, *, from_other_rank: bool = False) -> None:
        if self.status in (KVPoll.Failed, KVPoll.Success):
            return
        self.status = KVPoll.Failed
        self.reason = reason
        self.from_other_rank = from_other_rank

    def exception(self) -> TransferFailed:
        reason = self.reason or f"room {self.room}: transfer not failed (status {self.status.name})"
        return TransferFailed(f"kvbridge: {reason}", from_other_rank=self.from_other_rank)


State = TypeVar("State", bound=RoomState)


def admit(
    make: Callable[[int, str], State], room: Any, bootstrap_addr: str, live: Callable[[int], bool]
) -> State:
    """A new request's state: failed (room 0, touching nothing) if its room or address is
    unusable or the room is ``live`` already, else holding its room."""
    state = make(0, bootstrap_addr)
    try:
        value = check_room(room)
    except RoomError as exc:
        state.fail(str(exc))
        return state
    problem = address_problem(bootstrap_addr)
    if problem is None and live(value):
        problem = f"bootstrap_room {value} is already live here; each request needs its own room"
    if problem is not None:
        state.fail(problem)
        return state
    state.room = value
    return state
