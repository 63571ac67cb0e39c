"""What the decode and prefill sessions exchange with the wiring around them.

The callables through which a session hands messages to the control channel, the directory
it resolves prefill targets with, and how both sessions log aborts and late root causes. The
values they carry (:class:`~kvbridge.protocol.plan.PrefillTarget`, ``DecodePeer``,
``DecodeMetadata``) are the protocol's, in :mod:`kvbridge.protocol.plan`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from kvbridge.protocol.decode import AbortNotice, DecodeRequest, MetadataToSend
from kvbridge.protocol.outcomes import Aborted, LateCause
from kvbridge.protocol.plan import DecodeMetadata, DecodePeer, PrefillTarget

log = logging.getLogger("kvbridge")
Clock = Callable[[], float]


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
#: Performs an :class:`~kvbridge.protocol.decode.AbortNotice` (who hears a decode abort).
AbortSink = Callable[[AbortNotice], None]
CompletionSink = Callable[[int, tuple[DecodePeer, ...], bool, str | None], None]
AckSink = Callable[[int, tuple[DecodePeer, ...]], None]
ChecksumSink = Callable[[int, DecodePeer, int], None]

__all__ = [
    "AbortSink",
    "AckSink",
    "ChecksumSink",
    "Clock",
    "CompletionSink",
    "DecodeMetadata",
    "DecodePeer",
    "MetadataSink",
    "PrefillDirectory",
    "PrefillTarget",
    "Verifier",
    "log_abort",
    "report_late_causes",
]
