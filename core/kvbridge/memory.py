"""Page and aux-slot pools, the aux row layout, and descriptor building.

Pools are deterministic: the same sequence of alloc/free calls gives the same indices on every
rank, which is what lets all TP ranks allocate identically without talking to each other.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import attrs
import numpy as np

from kvbridge.errors import DoubleFreeError, LeakError, PoolError
from kvbridge.types import Descriptors, MemoryRegion


class IndexPool:
    """A pool of integer indices ``0..capacity-1`` with double-free and leak detection.

    Allocation takes from the low end of a LIFO stack, so a fresh pool hands out ascending
    contiguous runs (which merge into few descriptors) and a freed run is reused first.
    """

    kind = "index"

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"{self.kind} pool capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._stack = np.arange(capacity - 1, -1, -1, dtype=np.int64)
        self._top = capacity
        self._in_use = np.zeros(capacity, dtype=bool)

    @property
    def num_free(self) -> int:
        return self._top

    def can_alloc(self, count: int) -> bool:
        return count <= self._top

    def alloc(self, count: int) -> np.ndarray | None:
        """Take ``count`` indices, or return None (changing nothing) if too few are free."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} {self.kind}s")
        if count > self._top:
            return None
        taken = self._stack[self._top - count : self._top][::-1].copy()
        self._top -= count
        self._in_use[taken] = True
        return taken

    def free(self, indices: Sequence[int] | np.ndarray) -> None:
        """Return indices; raises :class:`DoubleFreeError` (changing nothing) on misuse."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self.capacity:
            raise PoolError(f"{self.kind} index out of range 0..{self.capacity - 1}: {idx}")
        # Strictly increasing (one index, or pages as alloc hands them out) has no duplicate;
        # a few indices are checked as a set (np.unique sorts, and costs a lazy import).
        if idx.size > 1 and not (idx[1:] > idx[:-1]).all():
            if idx.size <= 256:
                duplicated = len(set(idx.tolist())) != idx.size
            else:
                duplicated = np.unique(idx).size != idx.size
            if duplicated:
                raise DoubleFreeError(f"{self.kind}s freed twice in one call: {idx.tolist()}")
        not_in_use = idx[~self._in_use[idx]]
        if not_in_use.size:
            raise DoubleFreeError(f"{self.kind}(s) {not_in_use.tolist()} freed but not allocated")
        self._in_use[idx] = False
        self._stack[self._top : self._top + idx.size] = idx[::-1]
        self._top += idx.size

    def free_one(self, index: int) -> None:
        """:meth:`free` of a single index, without building an array for it."""
        index = int(index)
        if not 0 <= index < self.capacity:
            raise PoolError(f"{self.kind} index out of range 0..{self.capacity - 1}: {index}")
        if not self._in_use[index]:
            raise DoubleFreeError(f"{self.kind}(s) [{index}] freed but not allocated")
        self._in_use[index] = False
        self._stack[self._top] = index
        self._top += 1

    def in_use(self) -> np.ndarray:
        return np.flatnonzero(self._in_use)

    def check_no_leaks(self) -> None:
        leaked = self.in_use()
        if leaked.size:
            raise LeakError(f"{leaked.size} {self.kind}(s) still allocated: {leaked[:16].tolist()}")


class PagePool(IndexPool):
    kind = "page"


#: Default per-request results that decode needs from prefill, before the room stamp.
DEFAULT_AUX_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("output_token_id", "<i8", 1),
    ("output_token_logprob", "<f4", 1),
    ("cached_tokens", "<i4", 1),
)
ROOM_FIELD = "room"


@attrs.frozen
class AuxLayout:
    """The row layout of the metadata (aux) buffer.

    Fields are ``(name, numpy dtype, count)``; the uint64 room stamp is appended last so it is
    the last thing a row write lands. 0 in the stamp means "not written".
    """

    fields: tuple[tuple[str, str, int], ...] = DEFAULT_AUX_FIELDS

    def __attrs_post_init__(self) -> None:
        names = [f[0] for f in self.fields]
        if ROOM_FIELD in names or len(set(names)) != len(names):
            raise ValueError(f"aux field names must be unique and not {ROOM_FIELD!r}: {names}")

    @property
    def dtype(self) -> np.dtype:
        parts: list[tuple[str, str] | tuple[str, str, tuple[int]]] = [
            (name, dt) if count == 1 else (name, dt, (count,)) for name, dt, count in self.fields
        ]
        parts.append((ROOM_FIELD, "<u8"))
        return np.dtype(parts, align=True)

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize

    def allocate(self, num_slots: int) -> np.ndarray:
        """A zeroed structured array of ``num_slots`` rows (register it as the aux region)."""
        return np.zeros(num_slots, dtype=self.dtype)


class AuxSlotPool(IndexPool):
    """Aux-slot pool that zeroes a slot's room stamp whenever the slot is freed."""

    kind = "aux slot"

    def __init__(self, stamps: np.ndarray) -> None:
        super().__init__(len(stamps))
        self.stamps = stamps

    def free(self, indices: Sequence[int] | np.ndarray) -> None:
        super().free(indices)
        self.stamps[np.asarray(indices, dtype=np.int64)] = 0

    def free_one(self, index: int) -> None:
        super().free_one(index)
        self.stamps[int(index)] = 0


def _devices(regions: Sequence[MemoryRegion]) -> np.ndarray:
    """Each region's device code (-1 host, N for ``cuda:N``), as :class:`Descriptors` holds."""
    return np.array([r.device_index for r in regions], dtype=np.int32)


#: Up to this many pages a chunk's runs are found and its descriptors built in plain Python:
#: for a few pages numpy's per-call overhead (about 1 us a call, ~30 calls) is most of the cost.
_FEW_PAGES = 64


@attrs.frozen
class _RegionPair:
    """What descriptor building reads of a (source, destination) region list pair, computed
    once per pair: a rank writes to the same peer regions request after request."""

    src_addr: list[int]
    dst_addr: list[int]
    item: list[int]
    src_device: list[int]
    dst_device: list[int]
    src_base: np.ndarray  # (regions, 1) columns for the numpy path
    dst_base: np.ndarray
    item_column: np.ndarray


@functools.lru_cache(maxsize=1024)
def _region_pair(
    src_regions: tuple[MemoryRegion, ...], dst_regions: tuple[MemoryRegion, ...]
) -> _RegionPair:
    item = [r.item_bytes for r in src_regions]
    if item != [r.item_bytes for r in dst_regions]:
        raise ValueError("source and destination page sizes differ per region")
    src_addr, dst_addr = [r.addr for r in src_regions], [r.addr for r in dst_regions]
    return _RegionPair(
        src_addr,
        dst_addr,
        item,
        [r.device_index for r in src_regions],
        [r.device_index for r in dst_regions],
        np.array(src_addr, dtype=np.int64)[:, None],
        np.array(dst_addr, dtype=np.int64)[:, None],
        np.array(item, dtype=np.int64)[:, None],
    )


def page_runs(src_pages: np.ndarray, dst_pages: np.ndarray) -> tuple[np.ndarray, ...]:
    """Merge page pairs into runs where both sides are contiguous.

    Returns ``(src_start, dst_start, run_length)`` int64 arrays.
    """
    src = np.asarray(src_pages, dtype=np.int64)
    dst = np.asarray(dst_pages, dtype=np.int64)
    if src.shape != dst.shape:
        raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
    if src.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return src[starts], dst[starts], lengths


def _few_page_runs(src: list[int], dst: list[int]) -> tuple[list[int], list[int], list[int]]:
    """:func:`page_runs` on plain lists (non-empty, equal lengths)."""
    src_start, dst_start, run = [src[0]], [dst[0]], [1]
    for k in range(1, len(src)):
        if src[k] == src[k - 1] + 1 and dst[k] == dst[k - 1] + 1:
            run[-1] += 1
        else:
            src_start.append(src[k])
            dst_start.append(dst[k])
            run.append(1)
    return src_start, dst_start, run


def _whole_pages(
    src_regions: Sequence[MemoryRegion],
    dst_regions: Sequence[MemoryRegion],
    src_offset: int,
    dst_offset: int,
    length: int | None,
) -> bool:
    """Whether a page slice covers whole pages on both sides (then contiguous runs merge)."""
    return length is None or (
        src_offset == 0
        and dst_offset == 0
        and all(r.item_bytes == length for r in (*src_regions, *dst_regions))
    )


def kv_descriptors(
    src_regions: Sequence[MemoryRegion],
    dst_regions: Sequence[MemoryRegion],
    src_pages: np.ndarray,
    dst_pages: np.ndarray,
    *,
    src_offset: int = 0,
    dst_offset: int = 0,
    length: int | None = None,
) -> Descriptors:
    """(src, dst, length) writes for the given pages of every KV region.

    By default whole pages move and contiguous runs merge into one write. With a page slice
    (``length`` bytes from ``src_offset`` of each source page to ``dst_offset`` of each
    destination page, for TP sizes that differ) every page is its own write.
    """
    if len(src_regions) != len(dst_regions):
        raise ValueError(
            f"{len(src_regions)} source KV regions but {len(dst_regions)} destination regions"
        )
    if not _whole_pages(src_regions, dst_regions, src_offset, dst_offset, length):
        return _sliced_descriptors(
            src_regions, dst_regions, src_pages, dst_pages, src_offset, dst_offset, int(length or 0)
        )
    pair = _region_pair(tuple(src_regions), tuple(dst_regions))
    if len(src_pages) <= _FEW_PAGES and len(src_pages) == len(dst_pages):
        return _few_page_descriptors(pair, src_pages, dst_pages)
    s_start, d_start, run = page_runs(src_pages, dst_pages)
    if run.size == 0:
        return Descriptors.empty()
    return Descriptors(
        src=(pair.src_base + s_start * pair.item_column).reshape(-1),
        dst=(pair.dst_base + d_start * pair.item_column).reshape(-1),
        lengths=np.broadcast_to(run * pair.item_column, (len(pair.item), run.size))
        .reshape(-1)
        .copy(),
        src_device=np.repeat(np.array(pair.src_device, dtype=np.int32), run.size),
        dst_device=np.repeat(np.array(pair.dst_device, dtype=np.int32), run.size),
    )


def _few_page_descriptors(
    pair: _RegionPair,
    src_pages: np.ndarray,
    dst_pages: np.ndarray,
    aux_row: _AuxRow | None = None,
) -> Descriptors:
    src = np.asarray(src_pages, dtype=np.int64).tolist()
    dst = np.asarray(dst_pages, dtype=np.int64).tolist()
    if not src and aux_row is None:
        return Descriptors.empty()
    src_start, dst_start, run = _few_page_runs(src, dst) if src else ([], [], [])
    runs = len(run)
    items = pair.item
    src_addr = [base + p * item for base, item in zip(pair.src_addr, items) for p in src_start]
    dst_addr = [base + p * item for base, item in zip(pair.dst_addr, items) for p in dst_start]
    lengths = [n * item for item in items for n in run]
    src_device = [d for d in pair.src_device for _ in range(runs)]
    dst_device = [d for d in pair.dst_device for _ in range(runs)]
    if aux_row is not None:  # after the pages: the room stamp must never land first
        src_addr += aux_row.src
        dst_addr += aux_row.dst
        lengths += aux_row.lengths
        src_device += aux_row.src_device
        dst_device += aux_row.dst_device
    return Descriptors(
        np.array(src_addr, dtype=np.int64),
        np.array(dst_addr, dtype=np.int64),
        np.array(lengths, dtype=np.int64),
        src_device=np.array(src_device, dtype=np.int32),
        dst_device=np.array(dst_device, dtype=np.int32),
    )


def _sliced_descriptors(
    src_regions: Sequence[MemoryRegion],
    dst_regions: Sequence[MemoryRegion],
    src_pages: np.ndarray,
    dst_pages: np.ndarray,
    src_offset: int,
    dst_offset: int,
    length: int,
) -> Descriptors:
    src = np.asarray(src_pages, dtype=np.int64)
    dst = np.asarray(dst_pages, dtype=np.int64)
    if src.shape != dst.shape:
        raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
    for s, d in zip(src_regions, dst_regions):
        if src_offset + length > s.item_bytes or dst_offset + length > d.item_bytes:
            raise ValueError(
                f"page slice [{src_offset}, +{length}) -> [{dst_offset}, +{length}) does not fit "
                f"pages of {s.item_bytes} -> {d.item_bytes} bytes"
            )
    src_base = np.array([r.addr for r in src_regions], dtype=np.int64)[:, None]
    dst_base = np.array([r.addr for r in dst_regions], dtype=np.int64)[:, None]
    src_item = np.array([r.item_bytes for r in src_regions], dtype=np.int64)[:, None]
    dst_item = np.array([r.item_bytes for r in dst_regions], dtype=np.int64)[:, None]
    count = len(src_regions) * src.size
    return Descriptors(
        src=(src_base + src * src_item + src_offset).reshape(-1),
        dst=(dst_base + dst * dst_item + dst_offset).reshape(-1),
        lengths=np.full(count, length, dtype=np.int64),
        src_device=np.repeat(_devices(src_regions), src.size),
        dst_device=np.repeat(_devices(dst_regions), src.size),
    )


@attrs.frozen
class _AuxRow:
    """One aux row's writes as plain lists (one entry per aux region)."""

    src: list[int]
    dst: list[int]
    lengths: list[int]
    src_device: list[int]
    dst_device: list[int]


def _aux_row(
    src_regions: Sequence[MemoryRegion],
    dst_regions: Sequence[MemoryRegion],
    src_slot: int,
    dst_slot: int,
) -> _AuxRow:
    if len(src_regions) != len(dst_regions):
        raise ValueError(
            f"{len(src_regions)} source aux regions but {len(dst_regions)} destination regions"
        )
    return _AuxRow(
        [r.addr + src_slot * r.item_bytes for r in src_regions],
        [r.addr + dst_slot * r.item_bytes for r in dst_regions],
        [r.item_bytes for r in src_regions],
        [r.device_index for r in src_regions],
        [r.device_index for r in dst_regions],
    )


def aux_descriptors(
    src_regions: Sequence[MemoryRegion],
    dst_regions: Sequence[MemoryRegion],
    src_slot: int,
    dst_slot: int,
) -> Descriptors:
    """One write per aux region copying a whole row (room stamp included)."""
    row = _aux_row(src_regions, dst_regions, src_slot, dst_slot)
    return Descriptors(
        np.array(row.src, dtype=np.int64),
        np.array(row.dst, dtype=np.int64),
        np.array(row.lengths, dtype=np.int64),
        src_device=np.array(row.src_device, dtype=np.int32),
        dst_device=np.array(row.dst_device, dtype=np.int32),
    )


def chunk_descriptors(
    src_regions: Sequence[MemoryRegion],
    dst_regions: Sequence[MemoryRegion],
    src_pages: np.ndarray,
    dst_pages: np.ndarray,
    *,
    src_offset: int = 0,
    dst_offset: int = 0,
    length: int | None = None,
    aux: tuple[Sequence[MemoryRegion], Sequence[MemoryRegion], int, int] | None = None,
) -> Descriptors:
    """A chunk's writes: :func:`kv_descriptors` of its pages, then, for the last chunk,
    :func:`aux_descriptors` of ``aux`` = ``(src_aux_regions, dst_aux_regions, src_slot,
    dst_slot)``, in that order (the room stamp in the aux row must land last).

    The same runs as concatenating the two; for a few whole pages (the common chunk) both are
    built in one pass of plain Python, without the intermediate arrays.
    """
    if (
        _whole_pages(src_regions, dst_regions, src_offset, dst_offset, length)
        and len(src_pages) <= _FEW_PAGES
        and len(src_pages) == len(dst_pages)
        and len(src_regions) == len(dst_regions)
    ):
        pair = _region_pair(tuple(src_regions), tuple(dst_regions))
        row = _aux_row(*aux) if aux is not None else None
        return _few_page_descriptors(pair, src_pages, dst_pages, row)
    kv = kv_descriptors(
        src_regions,
        dst_regions,
        src_pages,
        dst_pages,
        src_offset=src_offset,
        dst_offset=dst_offset,
        length=length,
    )
    if aux is None:
        return kv
    return Descriptors.concat([kv, aux_descriptors(*aux)])
