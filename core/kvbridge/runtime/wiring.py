"""What the decode and prefill sessions exchange with the wiring around them.

The prefill ranks a room's plan names (:class:`PrefillTarget`), where a decode rank's memory is
(:class:`DecodePeer`), one decode rank's metadata (:class:`DecodeMetadata`), and the callables
through which a session hands messages to the control channel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import numpy as np

from kvbridge.protocol.decode import (
    DecodeRequest,
    MetadataToSend,
)
from kvbridge.protocol.outcomes import Aborted, LateCause
from kvbridge.types import Endpoint, MemoryRegion

log = logging.getLogger("kvbridge")
Clock = Callable[[], float]


@attrs.frozen
class PrefillTarget:
    """The prefill ranks that write one room into this decode rank (from rank mapping)."""

    peers: tuple[Endpoint, ...]
    #: Keys identifying the peers in completion messages (parallel to ``peers``).
    controls: tuple[Any, ...] = ()
    #: Whatever the wiring needs to send metadata (which ranks, page slices); opaque here.
    plan: Any = None
    #: The prefill instance serving the room, for liveness.
    bootstrap_addr: str = ""


class PrefillDirectory(Protocol):
    def resolve(self, requests: Sequence[DecodeRequest]) -> Mapping[int, PrefillTarget | str]:
        """Non-blocking: the targets known now; a string is a failure reason; absent = later."""


def log_abort(side: str, failed: Aborted) -> None:
    # The rank that saw the cause warns; ranks that only followed the reduction say so quietly.
    level = logging.INFO if failed.from_other_rank else logging.WARNING
    log.log(level, "%s room %d aborted: %s", side, failed.room, failed.reason)


def report_late_causes(
    role: Any, rank: Any, causes: Sequence[LateCause], observers: Any | None
) -> None:
    """Root causes for rooms this rank aborted as "failed on another rank" (rule 7): logged
    once each and told to ``observers`` (an ObserverRelay; None: no observers)."""
    side = str(getattr(role, "value", role))
    for cause in causes:
        log.warning(
            "%s room %d (aborted here as failed on another rank): root cause %s",
            side,
            cause.room,
            cause.reason,
        )
        if observers is not None:
            observers.call(
                "kvbridge_root_cause", role=role, rank=rank, room=cause.room, reason=cause.reason
            )


MetadataSink = Callable[[MetadataToSend, PrefillTarget], None]
#: ``(room, target, pages, aux_slot, checksums by writer) -> failure reason or None``.
Verifier = Callable[[int, PrefillTarget, np.ndarray, int, Mapping[object, int]], str | None]
#: ``(room, target, reason)``; reason None: this rank only followed another rank's failure.
AbortSink = Callable[[int, PrefillTarget | None, str | None], None]


@attrs.frozen
class DecodePeer:
    """A decode rank as a prefill rank sees it: where its memory is and how to reach it."""

    endpoint: Endpoint
    kv_regions: tuple[MemoryRegion, ...]
    aux_regions: tuple[MemoryRegion, ...]
    control: Any = None


@attrs.frozen(eq=False)
class DecodeMetadata:
    """Where one decode rank wants one room's KV: sent by decode after allocation."""

    room: int
    decode_rank: Any
    pages: np.ndarray
    aux_slot: int
    #: How many decode ranks send metadata for this room to this prefill rank.
    expected: int = 1
    #: ``(src_offset, dst_offset, length)`` of each page this rank writes; None = whole pages.
    page_slice: tuple[int, int, int] | None = None
    #: False when this prefill rank writes nothing for the room and only takes part.
    writes: bool = True


CompletionSink = Callable[[int, tuple[DecodePeer, ...], bool, str | None], None]
AckSink = Callable[[int, tuple[DecodePeer, ...]], None]
#: Marks a failure report from a rank that only followed another rank's failure.
FOLLOWED = "\x00followed"
ChecksumSink = Callable[[int, DecodePeer, int], None]
