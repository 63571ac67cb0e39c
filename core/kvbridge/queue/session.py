"""Engine-facing sessions: the I/O edge around the pure queues.

A session's step is ``prepare`` (drain control-channel events, resolve prefill targets, poll
the transport once, build the local vector) -> one reduce -> ``finish`` (apply the reduced
vector, execute the decisions). Engines call :meth:`step`; tests with in-process ranks call
``prepare``/``finish`` around their own reducer.

Events from other threads (completion and metadata messages) go through a lock-free deque and
are applied at the start of the next step, so all queue state is touched only by the
scheduler thread.
"""

from kvbridge.queue.decode_session import DecodeSession
from kvbridge.queue.prefill_session import PrefillSession
from kvbridge.queue.wiring import (
    AbortSink,
    AckSink,
    ChecksumSink,
    CompletionSink,
    DecodeMetadata,
    DecodePeer,
    MetadataSink,
    PrefillDirectory,
    PrefillTarget,
    Verifier,
)

__all__ = [
    "AbortSink",
    "AckSink",
    "ChecksumSink",
    "CompletionSink",
    "DecodeMetadata",
    "DecodePeer",
    "DecodeSession",
    "MetadataSink",
    "PrefillDirectory",
    "PrefillSession",
    "PrefillTarget",
    "Verifier",
]
