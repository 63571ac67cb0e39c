"""Is a batch of (addr, length) runs inside registered memory?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvbridge.errors import MemoryRegistrationError
from kvbridge.types import Descriptors, MemoryRegion


class RegionSet:
    """Fast membership test of (addr, length) runs against registered regions."""

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        ordered = sorted(regions, key=lambda r: r.addr)
        self.starts = np.array([r.addr for r in ordered], dtype=np.int64)
        self.ends = np.array([r.end for r in ordered], dtype=np.int64)

    def covers(self, addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if not len(self.starts):
            return np.zeros(len(addrs), dtype=bool)
        idx = np.searchsorted(self.starts, addrs, side="right") - 1
        safe = np.clip(idx, 0, None)
        return (idx >= 0) & (lengths >= 0) & (addrs + lengths <= self.ends[safe])

    def check_sources(self, room: int, descriptors: Descriptors, where: str) -> None:
        """Raise :class:`MemoryRegistrationError` naming the first unregistered source run."""
        bad = ~self.covers(descriptors.src, descriptors.lengths)
        if bad.any():
            i = int(np.argmax(bad))
            raise MemoryRegistrationError(
                f"room {room}: source [{int(descriptors.src[i]):#x}, "
                f"+{int(descriptors.lengths[i])}) is not in memory registered on {where}"
            )
