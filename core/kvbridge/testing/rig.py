"""Drive a transport through the real plugin loading and hook dispatch, without the engine.

Nothing here imports pytest: the demo and the benchmarks use these helpers on installs without
the test extras. Only :func:`require_transport` (called from tests) imports pytest, when called.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from kvbridge.buffers import RankBuffers
from kvbridge.config import TransferConfig
from kvbridge.memory import aux_descriptors, kv_descriptors
from kvbridge.status import KVPoll
from kvbridge.transport.facade import Transport
from kvbridge.transport.loading import LoadedTransport, TransportRegistry
from kvbridge.types import Descriptors, MemoryRegion, PeerWrite, RankIdentity, Role, SendChunk

#: Comma-separated transport names (or "all") whose absence fails tests instead of skipping
#: them; CI sets it so a missing native library can never pass silently.
ENV_REQUIRE = "KVBRIDGE_REQUIRE_TRANSPORTS"


class TransportHang(AssertionError):
    """A transfer did not reach a terminal status in time (a test failure, not an error)."""


def required_transports(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The names in ``ENV_REQUIRE`` (``all`` stands for every transport)."""
    value = (os.environ if environ is None else environ).get(ENV_REQUIRE, "")
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def require_transport(name: str, registry: TransportRegistry | None = None) -> LoadedTransport:
    """Return the loaded transport for a test.

    - no transport of that name is installed at all: the test **fails** (a typo in
      ``transport_name``, or the plugin's distribution is not installed in this environment);
    - it is installed but did not load (say its native library is missing): the test is
      skipped with the reason, or fails where ``ENV_REQUIRE`` names it (or ``all``).
    """
    import pytest  # only tests call this; the rest of the module stays pytest-free

    registry = registry or TransportRegistry.discover()
    try:
        return registry.get(name)
    except LookupError as exc:
        installed = {r.name for r in registry.records()}
        if name not in installed:
            pytest.fail(
                f"no transport named {name!r} is installed (installed: "
                f"{', '.join(sorted(installed)) or 'none'}): check transport_name and that "
                f"your package is installed (pip install -e .) with its entry point in the "
                f"group 'kvbridge.transports'"
            )
        required = required_transports()
        if name in required or "all" in required:
            pytest.fail(f"transport {name!r} is required here ({ENV_REQUIRE}) but: {exc}")
        pytest.skip(str(exc))


def wait_until_terminal(
    poll: Any, room: int, timeout: float, *, what: str = "room"
) -> tuple[KVPoll, str | None]:
    """Poll one room until Success or Failed; failing the test on a hang."""
    rooms = np.array([room], dtype=np.uint64)
    deadline = time.monotonic() + timeout
    while True:
        statuses, failures = poll(rooms)
        status = KVPoll(int(statuses[0]))
        if status in (KVPoll.Success, KVPoll.Failed):
            return status, failures.get(room)
        if time.monotonic() > deadline:
            raise TransportHang(
                f"{what} {room} still {status.name} after {timeout}s: the transport hangs"
            )
        time.sleep(0.001)


#: Buffers of the most recently closed rigs (see :meth:`TransferRig.close`).
_CLOSED_BUFFERS: collections.deque[tuple[RankBuffers, RankBuffers]] = collections.deque(maxlen=8)


class TransferRig:
    """A receiver (decode) and a sender (prefill) manager of one transport, with buffers."""

    def __init__(
        self,
        transport: Transport,
        config: TransferConfig,
        *,
        num_pages: int = 64,
        page_bytes: int = 4096,
        num_slots: int = 16,
    ) -> None:
        self.transport = transport
        self.config = config
        self.decode = RankBuffers.allocate(
            num_pages=num_pages, page_bytes=page_bytes, num_slots=num_slots
        )
        self.prefill = RankBuffers.allocate(
            num_pages=num_pages, page_bytes=page_bytes, num_slots=num_slots
        )
        self.receiver = transport.create_manager(
            config, RankIdentity(Role.DECODE), self.decode.kv_regions, self.decode.aux_regions
        )
        self.sender = transport.create_manager(
            config, RankIdentity(Role.PREFILL), self.prefill.kv_regions, self.prefill.aux_regions
        )

    def close(self) -> None:
        try:
            self.sender.close()
        finally:
            self.receiver.close()
            # A broken transport may still write after close (a posted write, a thread its
            # close did not stop): into freed memory that crashes the whole test run instead
            # of failing the test, so the last rigs' buffers stay allocated a while.
            _CLOSED_BUFFERS.append((self.decode, self.prefill))

    def open(self, room: int, dst_pages: np.ndarray, dst_slot: int) -> None:
        """Construct and init both sides, and announce the destination (send_metadata)."""
        self.receiver.receiver_construct(room)
        self.sender.sender_construct(room)
        self.receiver.receiver_init(room, (self.sender.endpoint,))
        self.receiver.receiver_send_metadata(room, dst_pages, dst_slot)
        self.sender.sender_init(room, (self.receiver.endpoint,))

    def chunk(
        self,
        src_pages: np.ndarray,
        dst_pages: np.ndarray,
        *,
        last_slots: tuple[int, int] | None = None,
        dst_kv: tuple[MemoryRegion, ...] | None = None,
    ) -> SendChunk:
        parts = [
            kv_descriptors(
                self.prefill.kv_regions, dst_kv or self.decode.kv_regions, src_pages, dst_pages
            )
        ]
        if last_slots is not None:
            parts.append(
                aux_descriptors(self.prefill.aux_regions, self.decode.aux_regions, *last_slots)
            )
        return SendChunk((PeerWrite(0, Descriptors.concat(parts)),), is_last=last_slots is not None)

    def transfer(
        self,
        room: int,
        src_pages: np.ndarray,
        dst_pages: np.ndarray,
        src_slot: int,
        dst_slot: int,
        *,
        chunks: int = 1,
    ) -> None:
        """Fill the source with room's pattern and send it in ``chunks`` pieces, aux last."""
        self.prefill.fill(room, src_pages)
        self.prefill.write_aux(src_slot, room)
        bounds = np.linspace(0, len(src_pages), chunks + 1).astype(int)
        for i in range(chunks):
            lo, hi = bounds[i], bounds[i + 1]
            last = (src_slot, dst_slot) if i == chunks - 1 else None
            self.sender.sender_send(
                room, self.chunk(src_pages[lo:hi], dst_pages[lo:hi], last_slots=last)
            )

    def wait_sender(self, room: int, timeout: float) -> tuple[KVPoll, str | None]:
        return wait_until_terminal(self.sender.sender_poll, room, timeout, what="sender room")


def load(name: str, options: Mapping[str, Any] | None = None) -> tuple[Transport, TransferConfig]:
    """The transport ``name`` and a config for it; LookupError (with the reason) if unusable."""
    config = TransferConfig(transport=name, transport_options=dict(options or {}))
    return Transport(TransportRegistry.discover().get(name)), config
