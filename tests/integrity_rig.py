"""One decode rank and any number of prefill instances (TP 1) in this process, for integrity
tests: real bootstrap servers, real control channel, real transports; the test drives every
scheduler step itself, so it decides exactly when each side learns what."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvbridge import PagePool, RankIdentity, Role, TransferConfig
from kvbridge.bootstrap.server import BootstrapServer
from kvbridge.protocol.decode import DecodeRequest
from kvbridge.protocol.outcomes import DecodeStep, PrefillStep
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.runtime.collective import SingleRankReducer
from kvbridge.runtime.decode_node import DecodeNode
from kvbridge.runtime.prefill_node import PrefillNode
from kvbridge.testing.buffers import RankBuffers

PAGE_BYTES = 4096
REGIONS = 2


class Prefill:
    def __init__(
        self, config: TransferConfig, pages: int, server: BootstrapServer | None = None
    ) -> None:
        self.own_server = server is None
        self.server = (
            server or BootstrapServer("127.0.0.1", 0, token=config.bootstrap_token).start()
        )
        self.addr = self.server.address
        self.buffers = RankBuffers.allocate(
            num_regions=REGIONS, num_pages=pages, page_bytes=PAGE_BYTES, num_slots=8
        )
        self.node = PrefillNode(
            config=config,
            rank=RankIdentity(Role.PREFILL),
            kv_regions=self.buffers.kv_regions,
            aux_regions=self.buffers.aux_regions,
            reducer=SingleRankReducer(),
            bootstrap_addr=self.addr,
            page_size=16,
            kv_dtype="uint8",
        )
        self.ready: set[int] = set()
        self.aborted: dict[int, str] = {}
        self.finished: set[int] = set()

    def step(self) -> PrefillStep:
        result = self.node.step()
        self.ready.update(result.ready)
        self.finished.update(result.finished)
        self.aborted.update((a.room, a.reason) for a in result.aborted)
        return result

    def send(self, room: int, fill: int, slot: int = 0) -> np.ndarray:
        """Fill this rank's pages 0..n-1 with ``fill`` and send them as the room's only chunk."""
        n = self.buffers.kv[0].shape[0]
        for region in self.buffers.kv:
            region[:] = fill
        self.buffers.write_aux(slot, room)
        self.node.send(room, np.arange(n), is_last=True, aux_slot=slot)
        return np.arange(n)

    def hold_writes(self) -> threading.Event:
        """Make every write of this rank's transport wait (in flight) until the event is set."""
        gate = threading.Event()
        manager = self.node.manager
        assert manager is not None
        real_write = manager.raw.write

        def held_write(*args: object, **kwargs: object) -> object:
            gate.wait(20)
            return real_write(*args, **kwargs)

        manager.raw.write = held_write
        return gate

    def close(self) -> None:
        self.node.close()
        if self.own_server:
            self.server.stop()


class Decode:
    def __init__(self, config: TransferConfig, pages: int, engine_pages: bool = False) -> None:
        """``engine_pages``: kvbridge gets no allocator; every request brings its pages."""
        self.buffers = RankBuffers.allocate(
            num_regions=REGIONS, num_pages=pages, page_bytes=PAGE_BYTES, num_slots=8
        )
        self.pool = PagePool(pages)
        self.node = DecodeNode(
            config=config,
            rank=RankIdentity(Role.DECODE),
            kv_regions=self.buffers.kv_regions,
            aux=self.buffers.aux,
            pages=None if engine_pages else self.pool,
            reducer=SingleRankReducer(),
            page_size=16,
            kv_dtype="uint8",
        )
        self.committed: dict[int, Any] = {}
        self.aborted: dict[int, str] = {}
        self.released: set[int] = set()

    def add(self, room: int, pages: int, prefill: Prefill) -> None:
        self.node.add([DecodeRequest(room, pages, prefill.addr)])

    def step(self) -> DecodeStep:
        result = self.node.step()
        self.committed.update((c.room, c) for c in result.committed)
        self.aborted.update((a.room, a.reason) for a in result.aborted)
        self.released.update(result.released)
        return result

    def pages_hold(self, room: int, fill: int) -> bool:
        pages = self.committed[room].pages
        return all(bool((region[pages] == fill).all()) for region in self.buffers.kv)

    def close(self) -> None:
        self.node.close()


def run_until(
    what: str,
    done: Callable[[], bool],
    *steppers: Any,
    timeout: float = 30.0,
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        for s in steppers:
            s.step()
        time.sleep(0.002)


def run_for(seconds: float, *steppers: Any) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for s in steppers:
            s.step()
        time.sleep(0.002)


def add_room(decode: Decode, prefill: Prefill, room: int, pages: int) -> None:
    decode.add(room, pages, prefill)
    prefill.node.add([PrefillRequest(room)])
