"""SGLang's KV and metadata buffers, described to kvbridge.

SGLang hands a backend raw pointers in ``KVArgs``: one buffer per layer for K and one for V
(``kv_data_ptrs``; MLA models have one latent buffer per layer), each a run of pages of
``kv_item_lens[i]`` bytes, and the metadata ("aux") buffers (``aux_data_ptrs``: first output
token, cached tokens, logprobs, hidden states, ..., and ``bootstrap_room``), one row per
metadata slot. Nothing here reads SGLang itself: the functions take plain lists, so they are
tested without SGLang installed.

Layouts (kvbridge's rank mapping, :mod:`kvbridge.mapping`):

- MLA: ``replicated`` (every TP rank holds the whole latent cache).
- MHA/GQA with page size 1: a page is one token, ``[heads, head_dim]``: a TP rank's heads are
  a contiguous slice of it, so ``head_sharded`` (prefill and decode TP may differ).
- MHA/GQA with larger pages: ``[page_size, heads, head_dim]`` is token-major, a rank's heads are
  not contiguous in a page: ``token_major`` (equal TP only; the mapping refuses other sizes).

The metadata rows travel inside kvbridge's own aux row: the prefill side packs its SGLang rows
into one opaque byte field, kvbridge moves it with the room stamp last, and the decode side
unpacks it into SGLang's rows (``bootstrap_room`` among them, what SGLang's metadata gate
waits for) before it reports the room complete.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import attrs
import numpy as np

from kvbridge import AuxLayout, MemoryRegion, RankIdentity, Role

AUX_FIELD = "sglang_rows"


def kv_layout_for(*, is_mla: bool, page_size: int) -> str:
    if is_mla:
        return "replicated"
    return "head_sharded" if page_size == 1 else "token_major"


def kv_regions(
    ptrs: Sequence[int], lens: Sequence[int], item_lens: Sequence[int], device: str
) -> list[MemoryRegion]:
    """One kvbridge region per SGLang KV buffer; one kvbridge page per SGLang page."""
    if not (len(ptrs) == len(lens) == len(item_lens)) or not ptrs:
        raise ValueError(
            f"KVArgs lists differ or are empty: {len(ptrs)} kv_data_ptrs, {len(lens)} "
            f"kv_data_lens, {len(item_lens)} kv_item_lens"
        )
    regions = []
    for ptr, length, item in zip(ptrs, lens, item_lens):
        whole = (int(length) // int(item)) * int(item)  # SGLang may pad past the last page
        regions.append(MemoryRegion(int(ptr), whole, int(item), device))
    return regions


@attrs.frozen
class MetadataRows:
    """SGLang's metadata buffers: buffer ``i`` holds one row of ``item_lens[i]`` bytes per slot.

    The decode side copies rows in on SGLang's scheduler thread, in ``poll()``, before it answers
    Success: SGLang's metadata gate reads ``bootstrap_room`` on that same thread afterwards, so
    the order of the copies within a slot does not matter.
    """

    ptrs: tuple[int, ...]
    item_lens: tuple[int, ...]
    num_slots: int

    @classmethod
    def from_kv_args(
        cls, ptrs: Sequence[int], lens: Sequence[int], item_lens: Sequence[int]
    ) -> MetadataRows:
        if not (len(ptrs) == len(lens) == len(item_lens)) or not ptrs:
            raise ValueError("aux_data_ptrs, aux_data_lens and aux_item_lens must match")
        if any(int(i) <= 0 for i in item_lens):
            raise ValueError(f"aux_item_lens must be positive, got {list(item_lens)}")
        slots = min(int(n) // int(i) for n, i in zip(lens, item_lens))
        return cls(tuple(map(int, ptrs)), tuple(map(int, item_lens)), slots)

    @property
    def row_bytes(self) -> int:
        return sum(self.item_lens)

    def aux_layout(self) -> AuxLayout:
        """kvbridge's aux row: every SGLang row of a slot, packed, then the room stamp."""
        return AuxLayout(fields=((AUX_FIELD, "u1", self.row_bytes),))

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"metadata slot {slot} out of range (0..{self.num_slots - 1})")

    def pack(self, slot: int, into: np.ndarray) -> None:
        """Copy SGLang's rows of ``slot`` into ``into`` (a uint8 array of :attr:`row_bytes`)."""
        self._check(slot)
        if into.nbytes != self.row_bytes or not into.flags.c_contiguous:
            raise ValueError(f"destination must be {self.row_bytes} contiguous bytes")
        dst = into.ctypes.data
        for ptr, item in zip(self.ptrs, self.item_lens):
            ctypes.memmove(dst, ptr + slot * item, item)
            dst += item

    def unpack(self, packed: np.ndarray, slot: int) -> None:
        """Write ``packed`` (from :meth:`pack` on the prefill) into SGLang's rows of ``slot``."""
        self._check(slot)
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        if packed.nbytes != self.row_bytes:
            raise ValueError(f"packed rows are {packed.nbytes} bytes, expected {self.row_bytes}")
        src = packed.ctypes.data
        for ptr, item in zip(self.ptrs, self.item_lens):
            ctypes.memmove(ptr + slot * item, src, item)
            src += item


@attrs.frozen
class RankLayout:
    """One SGLang rank's memory as kvbridge sees it, and who the rank is."""

    tp_rank: int
    tp_size: int
    kv_regions: tuple[MemoryRegion, ...]
    rows: MetadataRows
    page_size: int
    kv_dtype: str
    kv_layout: str

    @property
    def page_bytes(self) -> int:
        """Bytes one page occupies over every KV buffer of this rank."""
        return sum(r.item_bytes for r in self.kv_regions)

    def node_args(self, role: Role) -> dict[str, object]:
        """The keyword arguments a kvbridge node takes from this layout."""
        return dict(
            rank=RankIdentity(role, tp_rank=self.tp_rank, tp_size=self.tp_size),
            kv_regions=self.kv_regions,
            page_size=self.page_size,
            kv_dtype=self.kv_dtype,
            kv_layout=self.kv_layout,
        )
