"""Deliberately broken transports (the Fake with one rule broken each), to show that the
conformance kit catches what transports get wrong. Each is a ManagerHooks plugin object."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np

from kvbridge.transport.kit import ManagerHooks
from kvbridge.types import Descriptors
from kvbridge_fake.manager import FakeManager

CAPS = ("cross_process", "rejects_unregistered_memory")


class AcceptsAnyRoom(FakeManager):
    """Lands every write, for aborted, cleared and never-constructed rooms too."""

    def land(
        self,
        room: int,
        flags: int,
        dst: np.ndarray,
        lengths: np.ndarray,
        read_into: Callable[[int, int], object],
    ) -> str | None:
        for addr, n in zip(dst.tolist(), lengths.tolist()):
            read_into(addr, n)
        return None


class AuxFirst(FakeManager):
    """Writes the aux row (room stamp) at once and the KV pages a moment later."""

    def write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> str | None:
        if is_aux:
            return super().write(room, peer, runs, is_aux)
        timer = threading.Timer(0.05, super().write, args=(room, peer, runs, is_aux))
        timer.daemon = True
        timer.start()
        return None


class LeaksAfterDrain(FakeManager):
    """Posts writes that land later (like RDMA work requests) and counts them done at once:
    sender_drained says True while bytes are still on their way."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._posted: list[threading.Timer] = []

    def write(
        self, room: int, peer: Mapping[str, Any], runs: Descriptors, is_aux: bool
    ) -> str | None:
        timer = threading.Timer(0.2, super().write, args=(room, peer, runs, is_aux))
        timer.daemon = True
        self._posted.append(timer)
        timer.start()
        return None

    def release(self) -> None:
        # Broken in one rule only: closing still ends the posted writes (as a real transport
        # does its work requests), or one landing after the test freed its buffers would
        # write into freed memory and take the whole test process down.
        for timer in self._posted:
            timer.cancel()
        for timer in self._posted:
            timer.join()
        super().release()


class IgnoresUnknownOptions(FakeManager):
    """Drops option keys it does not know instead of refusing them."""

    def __init__(self, config: Any, *args: Any) -> None:
        known = {k: v for k, v in config.transport_options.items() if k in ("host", "faults")}
        super().__init__(attrs.evolve(config, transport_options=known), *args)


class ReceiverSucceeds(FakeManager):
    """Correct, and its receiver reports the advisory Success the hookspec allows once the aux
    row landed (the kit's abort test used to fail such a transport at random)."""

    def land(
        self,
        room: int,
        flags: int,
        dst: np.ndarray,
        lengths: np.ndarray,
        read_into: Callable[[int, int], object],
    ) -> str | None:
        from kvbridge.status import KVPoll
        from kvbridge_fake import wire

        error = super().land(room, flags, dst, lengths, read_into)
        if error is None and flags & wire.FLAG_AUX:
            self.receivers.advance(room, KVPoll.Success)
        return error


def hooks(manager: type[FakeManager], *extra: str) -> ManagerHooks:
    return ManagerHooks("fake", manager, api_version="1.1", capabilities=(*CAPS, *extra))


ACCEPTS_ANY_ROOM = hooks(AcceptsAnyRoom)
AUX_FIRST = hooks(AuxFirst)
LEAKS_AFTER_DRAIN = hooks(LeaksAfterDrain, "one_sided_writes")
IGNORES_UNKNOWN_OPTIONS = hooks(IgnoresUnknownOptions)
RECEIVER_SUCCEEDS = hooks(ReceiverSucceeds)
