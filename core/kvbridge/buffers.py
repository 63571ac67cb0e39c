"""Host buffers shaped like an engine's KV cache and aux rows, with verifiable byte patterns.

Used by `kvbridge demo`, the benchmarks and the conformance kit; plain numpy, no test code.
"""

from __future__ import annotations

import attrs
import numpy as np

from kvbridge.memory import AuxLayout
from kvbridge.types import MemoryRegion

_PATTERN_BASE = np.arange(1 << 16, dtype=np.uint32)


def page_pattern(room: int, region: int, position: int, page_bytes: int) -> np.ndarray:
    """The bytes that page ``position`` of request ``room`` holds in KV region ``region``."""
    seed = (room * 0x9E3779B1 + region * 0x85EBCA6B + position * 0xC2B2AE35) & 0xFFFFFFFF
    reps = -(-page_bytes // _PATTERN_BASE.size)
    base = np.tile(_PATTERN_BASE, reps)[:page_bytes] if reps > 1 else _PATTERN_BASE[:page_bytes]
    return ((base * 2654435761 + seed) >> 13).astype(np.uint8)


@attrs.define(eq=False)
class RankBuffers:
    """One rank's KV regions (``num_regions`` arrays of pages) and its aux rows."""

    kv: list[np.ndarray]
    aux: np.ndarray
    layout: AuxLayout

    @classmethod
    def allocate(
        cls,
        *,
        num_regions: int = 4,
        num_pages: int = 64,
        page_bytes: int = 4096,
        num_slots: int = 16,
        layout: AuxLayout | None = None,
    ) -> RankBuffers:
        layout = layout or AuxLayout()
        kv = [np.zeros((num_pages, page_bytes), dtype=np.uint8) for _ in range(num_regions)]
        return cls(kv=kv, aux=layout.allocate(num_slots), layout=layout)

    @property
    def page_bytes(self) -> int:
        return int(self.kv[0].shape[1])

    @property
    def kv_regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(MemoryRegion.of(a, self.page_bytes) for a in self.kv)

    @property
    def aux_regions(self) -> tuple[MemoryRegion, ...]:
        return (MemoryRegion.of(self.aux, self.layout.row_bytes),)

    @property
    def stamps(self) -> np.ndarray:
        return self.aux["room"]

    #: ``(offset, global_page_bytes)``: this rank holds a slice of a larger logical page (a
    #: TP shard of head-sharded KV). None: it holds whole pages.
    shard: tuple[int, int] | None = None

    def expected(self, room: int, region: int, position: int) -> np.ndarray:
        if self.shard is None:
            return page_pattern(room, region, position, self.page_bytes)
        offset, total = self.shard
        return page_pattern(room, region, position, total)[offset : offset + self.page_bytes]

    def fill(self, room: int, pages: np.ndarray, first_position: int = 0) -> None:
        """Write ``room``'s pattern into ``pages`` (request positions from ``first_position``)."""
        for r, region in enumerate(self.kv):
            for i, page in enumerate(np.asarray(pages).tolist()):
                region[page] = self.expected(room, r, first_position + i)

    def write_aux(self, slot: int, room: int) -> None:
        """Fill an aux row with values derived from ``room``, stamp last."""
        row = self.aux[slot]
        row["output_token_id"] = room % 50_000
        row["output_token_logprob"] = -1.0 / (1 + room % 97)
        row["cached_tokens"] = room % 13
        row["room"] = room

    def mismatches(self, room: int, pages: np.ndarray, first_position: int = 0) -> list[str]:
        """Describe every page of ``pages`` that does not hold ``room``'s pattern."""
        bad = []
        for r, region in enumerate(self.kv):
            for i, page in enumerate(np.asarray(pages).tolist()):
                want = self.expected(room, r, first_position + i)
                if not np.array_equal(region[page], want):
                    bad.append(f"region {r} page {page} (position {first_position + i})")
        return bad

    def aux_matches(self, slot: int, room: int) -> bool:
        row = self.aux[slot]
        return (
            int(row["room"]) == room
            and int(row["output_token_id"]) == room % 50_000
            and int(row["cached_tokens"]) == room % 13
        )
