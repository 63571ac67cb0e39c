"""RegionSet: which (addr, length) runs lie inside registered memory, for every batch size.

Transports check both their own sources and (the Fake's receiver, any transport that lands
writes itself) destinations from the network with it, so lengths may be anything an int64
holds: a run whose end does not fit in 64 bits is never covered.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kvbridge.errors import MemoryRegistrationError
from kvbridge.transport.kit import RegionSet
from kvbridge.types import Descriptors, MemoryRegion

INT64 = st.integers(-(2**63), 2**63 - 1)
#: Regions at fixed, non-overlapping addresses (MemoryRegion only records numbers).
REGIONS = [MemoryRegion(0x10000, 0x4000, 0x1000), MemoryRegion(0x40000, 0x100, 0x100)]


def reference(addr: int, length: int) -> bool:
    """Exact integers: inside the region with the highest start at or below addr."""
    below = [r for r in REGIONS if r.addr <= addr]
    if not below:
        return False
    region = max(below, key=lambda r: r.addr)
    return length >= 0 and addr + length <= region.end


near_regions = st.one_of(
    INT64,
    st.sampled_from([r.addr for r in REGIONS] + [r.end for r in REGIONS]).flatmap(
        lambda a: st.integers(a - 8, a + 8)
    ),
)
lengths = st.one_of(INT64, st.integers(-2, 0x5000), st.sampled_from([2**63 - 1, 2**62]))


@given(st.lists(st.tuples(near_regions, lengths), max_size=40))
@example([(0x10000, 2**63 - 0x10000 + 8)])  # addr + length wraps below the region's end
@example([(0x10000, 2**63 - 0x10000 + 8)] * 17)  # the same past the small-batch path
@example([(0x10000, 0x4000)] * 17 + [(0x13FFF, 2)])
def test_covers_matches_exact_arithmetic_for_any_batch(runs: list[tuple[int, int]]) -> None:
    regions = RegionSet(REGIONS)
    addrs = np.array([a for a, _ in runs], dtype=np.int64)
    lens = np.array([n for _, n in runs], dtype=np.int64)
    expected = [reference(a, n) for a, n in runs]
    assert regions.covers(addrs, lens).tolist() == expected
    first = regions.first_uncovered(addrs, lens)
    assert first == (expected.index(False) if False in expected else None)


@pytest.mark.parametrize("runs", [1, 17])
def test_check_sources_names_the_first_unregistered_run(runs: int) -> None:
    src = np.full(runs, 0x10000, dtype=np.int64)
    src[-1] = 0x20000  # between the two regions
    d = Descriptors(src, src.copy(), np.full(runs, 0x100, dtype=np.int64))
    with pytest.raises(MemoryRegistrationError, match=r"room 7: source \[0x20000, \+256\)"):
        RegionSet(REGIONS).check_sources(7, d, "here")


def test_no_regions_cover_nothing() -> None:
    for n in (1, 17):
        addrs = np.zeros(n, dtype=np.int64)
        assert not RegionSet([]).covers(addrs, addrs).any()
