"""Pools and descriptor building, checked against naive reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbridge import AuxLayout, AuxSlotPool, Descriptors, MemoryRegion, PagePool, memory
from kvbridge.errors import DoubleFreeError, LeakError, MemoryRegistrationError
from kvbridge.memory import aux_descriptors, chunk_descriptors, kv_descriptors, page_runs


class PoolMachine(RuleBasedStateMachine):
    """Random alloc/free sequences against a set-based reference."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(24)
        self.held: list[np.ndarray] = []
        self.reference_free = set(range(24))

    @rule(count=st.integers(0, 30))
    def alloc(self, count: int) -> None:
        got = self.pool.alloc(count)
        if count > len(self.reference_free):
            assert got is None
            return
        assert got is not None and len(got) == count
        assert set(got.tolist()) <= self.reference_free
        self.reference_free -= set(got.tolist())
        self.held.append(got)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        block = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.free(block)
        self.reference_free |= set(block.tolist())

    @precondition(lambda self: self.held and len(self.held[0]))
    @rule()
    def double_free_is_refused_and_changes_nothing(self) -> None:
        block = self.held[0]
        before = self.pool.num_free
        with pytest.raises(DoubleFreeError):
            self.pool.free(np.concatenate([block, block[:1]]))
        assert self.pool.num_free == before

    @invariant()
    def counts_agree(self) -> None:
        assert self.pool.num_free == len(self.reference_free)
        assert set(self.pool.in_use().tolist()) == set(range(24)) - self.reference_free


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_fresh_pool_hands_out_contiguous_runs_and_reuses_freed_ones_first() -> None:
    pool = PagePool(10)
    first = pool.alloc(4)
    assert first.tolist() == [0, 1, 2, 3]
    assert pool.alloc(2).tolist() == [4, 5]
    pool.free(first)
    assert pool.alloc(4).tolist() == [0, 1, 2, 3]


def test_leaks_are_reported_with_indices() -> None:
    pool = PagePool(4)
    pool.alloc(2)
    with pytest.raises(LeakError, match=r"2 page\(s\) still allocated: \[0, 1\]"):
        pool.check_no_leaks()


def test_freeing_an_unallocated_or_out_of_range_index_is_refused() -> None:
    pool = PagePool(4)
    with pytest.raises(DoubleFreeError, match="freed but not allocated"):
        pool.free([1])
    with pytest.raises(Exception, match="out of range"):
        pool.free([9])


@pytest.mark.parametrize("free", ["free", "free_one"])
def test_aux_pool_zeroes_the_room_stamp_on_free(free: str) -> None:
    layout = AuxLayout()
    aux = layout.allocate(4)
    pool = AuxSlotPool(aux["room"])
    (slot,) = pool.alloc(1)
    aux[slot]["room"] = 77
    getattr(pool, free)([slot] if free == "free" else slot)
    assert aux["room"][slot] == 0
    assert pool.num_free == 4
    assert pool.alloc(1).tolist() == [slot]  # a freed slot is reused first


def test_freeing_one_index_is_checked_like_freeing_many() -> None:
    pool = AuxSlotPool(AuxLayout().allocate(4)["room"])
    with pytest.raises(DoubleFreeError, match="freed but not allocated"):
        pool.free_one(1)
    for bad in (-1, 4):
        with pytest.raises(Exception, match="out of range"):
            pool.free_one(bad)
    (slot,) = pool.alloc(1)
    pool.free_one(slot)
    with pytest.raises(DoubleFreeError):
        pool.free_one(slot)
    assert pool.num_free == 4
    pool.check_no_leaks()


def test_aux_layout_puts_the_room_stamp_last() -> None:
    layout = AuxLayout((("token", "<i4", 1), ("top", "<f4", 5)))
    dtype = layout.dtype
    assert dtype.names[-1] == "room"
    assert dtype.fields["room"][1] + 8 == layout.row_bytes
    with pytest.raises(ValueError, match="room"):
        AuxLayout((("room", "<i8", 1),))


def naive_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


pages = st.lists(st.integers(0, 40), max_size=30)


@given(st.data())
def test_page_runs_match_the_naive_merge(data: st.DataObject) -> None:
    src = data.draw(pages)
    dst = data.draw(st.lists(st.integers(0, 40), min_size=len(src), max_size=len(src)))
    s, d, n = page_runs(np.array(src), np.array(dst))
    assert list(zip(s.tolist(), d.tolist(), n.tolist())) == naive_runs(src, dst)


def _chunk(data: st.DataObject, most: int) -> tuple[list[int], list[int]]:
    """Source and destination pages of one chunk: runs of consecutive pages, shuffled."""
    n = data.draw(st.integers(0, most))
    pool = most + 8
    src = data.draw(st.sampled_from(["runs", "shuffled"]))
    if src == "runs":
        start_s, start_d = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 8))
        cut = data.draw(st.integers(0, n))
        return list(range(start_s, start_s + n)), [
            *range(start_d, start_d + cut),
            *range(start_d + cut + 1, start_d + n + 1),
        ]
    return data.draw(st.permutations(range(pool)))[:n], data.draw(st.permutations(range(pool)))[:n]


@given(st.data())
def test_kv_descriptors_cover_exactly_the_pages(data: st.DataObject) -> None:
    """Both ways of building them (plain Python up to a few dozen pages, numpy beyond)."""
    src, dst = _chunk(data, 150)
    page = 64
    src_regions = [MemoryRegion(0x100000 * (r + 1), 160 * page, page) for r in range(3)]
    dst_regions = [MemoryRegion(0x9000000 + 0x100000 * r, 160 * page, page) for r in range(3)]
    d = kv_descriptors(src_regions, dst_regions, np.array(src), np.array(dst))
    expanded = set()
    for s_addr, d_addr, length in zip(d.src.tolist(), d.dst.tolist(), d.lengths.tolist()):
        assert length % page == 0
        for k in range(length // page):
            expanded.add((s_addr + k * page, d_addr + k * page))
    reference = {
        (sr.addr + s * page, dr.addr + t * page)
        for sr, dr in zip(src_regions, dst_regions)
        for s, t in zip(src, dst)
    }
    assert expanded == reference
    assert len(d) == 3 * len(naive_runs(list(src), list(dst)))


@given(st.data())
def test_few_pages_build_the_same_descriptors_as_many(data: st.DataObject) -> None:
    src, dst = _chunk(data, 60)
    regions = [
        MemoryRegion(0x100000 * (r + 1), 80 * 64, 64, "cuda:1" if r else "cpu") for r in range(2)
    ]
    peer = [MemoryRegion(0x9000000 + 0x100000 * r, 80 * 64, 64, f"cuda:{r}") for r in range(2)]
    few = kv_descriptors(
        regions, peer, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory, "_FEW_PAGES", -1)  # the numpy path, as many pages take
        slow = kv_descriptors(
            regions, peer, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
        )
    for name in ("src", "dst", "lengths", "src_device", "dst_device"):
        a, b = getattr(few, name), getattr(slow, name)
        assert a.dtype == b.dtype and a.tolist() == b.tolist(), name


@given(st.data())
def test_a_chunk_is_its_pages_then_its_aux_row(data: st.DataObject) -> None:
    """``chunk_descriptors`` (one pass for a few pages) against concatenating the parts."""
    src, dst = _chunk(data, 100)
    if data.draw(st.booleans()):
        src, dst = [], []  # a last chunk may carry only the aux row
    regions = [
        MemoryRegion(0x100000 * (r + 1), 120 * 64, 64, "cuda:1" if r else "cpu") for r in range(2)
    ]
    peer = [MemoryRegion(0x9000000 + 0x100000 * r, 120 * 64, 64, f"cuda:{r}") for r in range(2)]
    aux_src = [MemoryRegion(0x5000000, 4 * 32, 32), MemoryRegion(0x6000000, 4 * 16, 16, "cuda:1")]
    aux_dst = [MemoryRegion(0x7000000, 8 * 32, 32, "cuda:0"), MemoryRegion(0x8000000, 8 * 16, 16)]
    aux = (aux_src, aux_dst, data.draw(st.integers(0, 3)), data.draw(st.integers(0, 7)))
    with_aux = data.draw(st.booleans())
    pages = np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
    got = chunk_descriptors(regions, peer, *pages, aux=aux if with_aux else None)
    parts = [kv_descriptors(regions, peer, *pages)]
    if with_aux:
        parts.append(aux_descriptors(*aux))
    want = Descriptors.concat(parts)
    for name in ("src", "dst", "lengths", "src_device", "dst_device"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.tolist() == b.tolist(), name
    if with_aux:  # the room stamp's row lands last
        assert got.src[len(got) - 2 :].tolist() == aux_descriptors(*aux).src.tolist()


def test_a_chunk_refuses_aux_regions_that_do_not_pair() -> None:
    with pytest.raises(ValueError, match="aux regions"):
        chunk_descriptors(
            [MemoryRegion(0x1000, 4 * 64, 64)],
            [MemoryRegion(0x9000, 4 * 64, 64)],
            np.arange(2),
            np.arange(2),
            aux=([MemoryRegion(0x20000, 64, 32)], [], 0, 0),
        )


def test_descriptors_refuse_regions_whose_page_sizes_differ() -> None:
    with pytest.raises(ValueError, match="page sizes differ"):
        kv_descriptors(
            [MemoryRegion(0x1000, 4 * 64, 64)],
            [MemoryRegion(0x9000, 4 * 32, 32)],
            np.arange(2),
            np.arange(2),
        )


def test_aux_descriptors_copy_whole_rows() -> None:
    src = [MemoryRegion(0x1000, 4 * 32, 32)]
    dst = [MemoryRegion(0x8000, 8 * 32, 32)]
    d = aux_descriptors(src, dst, 1, 5)
    assert (d.src.tolist(), d.dst.tolist(), d.lengths.tolist()) == ([0x1020], [0x80A0], [32])


def test_memory_region_checks() -> None:
    with pytest.raises(MemoryRegistrationError, match="not a multiple"):
        MemoryRegion(0x1000, 100, 64)
    with pytest.raises(ValueError, match="addr must be >= 1"):
        MemoryRegion(0, 64, 64)
    with pytest.raises(MemoryRegistrationError, match="contiguous"):
        MemoryRegion.of(np.zeros((4, 4))[:, ::2])
    import torch

    t = torch.zeros(8, 16, dtype=torch.uint8)
    region = MemoryRegion.of(t)
    assert (region.addr, region.length, region.item_bytes) == (t.data_ptr(), 128, 16)


@pytest.mark.parametrize("count", [3, 300])
def test_an_index_twice_in_one_free_is_refused_and_changes_nothing(count: int) -> None:
    pool = PagePool(512)
    taken = pool.alloc(count)
    assert taken is not None
    twice = np.concatenate([taken[::-1], taken[:1]])  # not increasing, one index repeated
    with pytest.raises(DoubleFreeError, match="freed twice in one call"):
        pool.free(twice)
    assert pool.num_free == 512 - count
    pool.free(taken[::-1])
    pool.check_no_leaks()
