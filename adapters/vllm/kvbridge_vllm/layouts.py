"""vLLM's KV cache tensors, described to kvbridge's rank mapping from their shapes and strides.

vLLM 0.32 allocates every layer's KV cache in one flat byte buffer and hands the connector one
4-D view per layer, logical ``[blocks, heads, tokens, content]`` (``content`` is K then V of one
head and token, ``head_size + head_size_v`` elements, or the MLA latent vector). The order of
those axes in memory, with the layer axis L, is the engine's KV cache layout
(``VLLM_KV_CACHE_LAYOUT``: ``LBHNC`` alias ``HND``, ``LBNHC`` alias ``NHD``, ``LHBNC``, ``BLHNC``,
``BLNHC``, ``BHLNC``). This module reads that order off the views' strides and addresses (never
the backend's name) and says what kvbridge can do with it:

- a block's bytes of a layer (or, blocks outermost, of every layer) form one run: one kvbridge
  page per vLLM block; otherwise the cache is refused;
- head-major pages (``LBHNC``) whose head axis is the KV heads: ``head_sharded`` (a TP rank's
  heads are one slice of a page, so prefill and decode TP may differ);
- MLA's latent cache (every TP rank holds all of it): ``replicated``, any TP sizes;
- everything else that is one run per block (``LBNHC``, blocks outermost, a block split into
  head-major kernel blocks, K/V packed into head slots): ``token_major``, equal TP only.

The kind carries the page description after a colon (``head_sharded:vllm LBHNC 256B``), which
decode compares with the prefill's verbatim, so two layouts never pair by accident.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import attrs

from kvbridge import MemoryRegion
from kvbridge_vllm.version import Unsupported

#: What KvbridgeConnector asks vLLM for (``get_required_kvcache_layout``): head-major pages.
HEAD_MAJOR = "LBHNC"
_AXES = "BHNC"  # the logical axes of one layer's view


@attrs.frozen
class PageContent:
    """What the spec vLLM published for the cache group says about a page's head axis."""

    #: Every TP rank holds the whole cache (MLA's latent vector: one head, ``max_tp_shards=1``).
    replicated: bool = False
    #: The head axis indexes KV heads (False when a backend packs K and V into head slots,
    #: ``num_head_slots``: then a rank's heads are not one slice of the head axis).
    heads_are_kv_heads: bool = True

    @classmethod
    def of(cls, spec: Any, use_mla: bool = False) -> PageContent:
        return cls(
            replicated=use_mla or getattr(spec, "max_tp_shards", None) == 1,
            heads_are_kv_heads=getattr(spec, "num_head_slots", None) is None,
        )


@attrs.frozen
class KvDescription:
    regions: tuple[MemoryRegion, ...]
    #: kvbridge ``kv_layout``: mapping kind, ``:``, the page description.
    kv_layout: str
    #: The axis order in memory, in vLLM's names (``LBHNC``...).
    physical: str
    #: Why only equal TP sizes pair (None when unequal TP works).
    equal_tp_only: str | None

    @property
    def kind(self) -> str:
        return self.kv_layout.partition(":")[0]


@attrs.frozen
class _View:
    """One distinct layer cache: byte strides of its logical axes, its address, its span."""

    name: str
    addr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes, logical B H N C
    element_size: int
    tensor: Any = attrs.field(eq=False, repr=False)


def _refuse(what: str) -> Unsupported:
    return Unsupported(
        f"kvbridge-vllm cannot describe this KV cache: {what}. Use a layout whose blocks are "
        f"one run of bytes: VLLM_KV_CACHE_LAYOUT={HEAD_MAJOR} (head-major, any TP sizes), or "
        f"leave it unset (KvbridgeConnector asks vLLM for {HEAD_MAJOR})"
    )


def _views(kv_caches: Mapping[str, Any]) -> list[_View]:
    seen: set[int] = set()
    views = []
    for name, tensor in kv_caches.items():
        if tensor.data_ptr() in seen:  # layers sharing one cache (vLLM's KV sharing)
            continue
        seen.add(tensor.data_ptr())
        if tensor.dim() != 4:
            raise _refuse(
                f"layer {name}'s cache has shape {tuple(tensor.shape)}, not vLLM 0.32's "
                f"[blocks, heads, tokens, content] view"
            )
        es = tensor.element_size()
        views.append(
            _View(
                name,
                tensor.data_ptr(),
                tuple(int(s) for s in tensor.shape),
                tuple(int(s) * es for s in tensor.stride()),
                es,
                tensor,
            )
        )
    first = views[0]
    for v in views[1:]:
        if (v.shape, v.strides, v.element_size) != (first.shape, first.strides, first.element_size):
            raise _refuse(
                f"layers {first.name} and {v.name} have caches of another shape or layout "
                f"({first.shape} vs {v.shape}, byte strides {first.strides} vs {v.strides})"
            )
    return sorted(views, key=lambda v: v.addr)


def _order(view: _View, layer_stride: int | None) -> str:
    """The axes from outermost to innermost in memory, as vLLM names layouts.

    Size-1 heads or tokens carry no order (their stride is arbitrary): they are placed as in
    a head-major page, so one-head MLA pages read ``HNC`` whatever vLLM's enum said."""
    strided = [(s, a) for a, n, s in zip(_AXES, view.shape, view.strides) if n > 1 or a in "BC"]
    if layer_stride is not None:
        strided.append((layer_stride, "L"))
    order = "".join(a for _, a in sorted(strided, key=lambda x: -x[0]))
    if layer_stride is None:
        order = "L" + order
    for axis in "HN":
        if axis not in order:
            if axis == "H":
                at = order.index("N") if "N" in order else order.index("C")
            else:
                at = order.index("C")
            order = order[:at] + axis + order[at:]
    return order


def _span(view: _View, kernel_blocks: int) -> int:
    """Bytes from the first to one past the last byte of a vLLM block (its kernel blocks)."""
    inner = sum((n - 1) * s for n, s in zip(view.shape[1:], view.strides[1:]))
    return (kernel_blocks - 1) * view.strides[0] + inner + view.element_size


def _kernel_blocks(view: _View, block_size: int, num_blocks: int | None) -> int:
    """How many of the view's blocks make one vLLM block (vLLM splits a block into kernel
    blocks when the attention kernel needs smaller ones)."""
    rows = view.shape[0]
    if num_blocks:
        if rows % num_blocks:
            raise _refuse(f"layer {view.name} has {rows} cache blocks for {num_blocks} vLLM blocks")
        return rows // num_blocks
    tokens = view.shape[2]
    if block_size % tokens:
        raise _refuse(f"layer {view.name} has blocks of {tokens} tokens, not {block_size}")
    return block_size // tokens


def _region(view: _View, length: int, item_bytes: int) -> MemoryRegion:
    """``length`` bytes from ``view``'s first block, checked to lie in its allocation."""
    storage = view.tensor.untyped_storage()
    start = view.addr - storage.data_ptr()
    if start < 0 or start + length > storage.nbytes():
        raise _refuse(
            f"the blocks of layer {view.name} would reach past the cache allocation "
            f"({length} bytes at offset {start} of {storage.nbytes()})"
        )
    return MemoryRegion(view.addr, length, item_bytes, str(view.tensor.device))


def describe_kv_caches(
    kv_caches: Mapping[str, Any],
    block_size: int,
    *,
    num_blocks: int | None = None,
    content: PageContent | None = None,
) -> KvDescription:
    """kvbridge regions (one page per vLLM block) and ``kv_layout`` for vLLM's layer caches.

    ``num_blocks`` is the number of vLLM blocks (``KVCacheConfig.num_blocks``): it tells a
    cache split into kernel blocks from one that is not. Raises :class:`Unsupported` naming
    the layout when a block is not one run of bytes."""
    content = content or PageContent()
    if not kv_caches:
        raise _refuse("vLLM registered no KV cache tensors")
    views = _views(kv_caches)
    first = views[0]
    kernel_blocks = _kernel_blocks(first, block_size, num_blocks)
    blocks = first.shape[0] // kernel_blocks
    block_stride = kernel_blocks * first.strides[0]
    span = _span(first, kernel_blocks)
    steps = {b.addr - a.addr for a, b in itertools.pairwise(views)}
    layer_stride = min(steps) if steps else None
    physical = _order(first, layer_stride)
    if span > block_stride:
        raise _refuse(
            f"the layout is {physical}: a block of a layer is not one run of bytes "
            f"({span} bytes from its first to its last byte, {block_stride} between blocks)"
        )
    region_length = blocks * block_stride
    if layer_stride is None or layer_stride >= region_length:
        # Layers outermost: one region per layer, a page is that layer's block.
        regions = tuple(_region(v, region_length, block_stride) for v in views)
        layers_in_page = False
    elif views[-1].addr - first.addr + span <= block_stride and all(
        v.tensor.untyped_storage().data_ptr() == first.tensor.untyped_storage().data_ptr()
        for v in views
    ):
        # Blocks outermost: one region, a page is a block holding every layer's page.
        regions = (_region(first, region_length, block_stride),)
        layers_in_page = True
    else:
        raise _refuse(
            f"the layout is {physical}: layers {first.name}.. are interleaved with their blocks "
            f"in a way that is neither layer-outermost nor block-outermost"
        )
    head_major = physical.endswith("HNC")
    heads = first.shape[1]
    split_heads = kernel_blocks > 1 and head_major and heads > 1
    page = f"vllm {physical} {first.shape[3] * first.element_size}B"
    if split_heads:
        page += f" kernel {first.shape[2]}"
    if not content.heads_are_kv_heads:
        page += " slots"
    reason = None
    if content.replicated:
        kind = "replicated"
    else:
        kind = "head_sharded"
        if layers_in_page:
            reason = f"{physical}: each block holds every layer's page"
        elif not head_major:
            reason = f"{physical}: token-major blocks (a rank's heads are in every token)"
        elif split_heads:
            reason = (
                f"a vLLM block of {block_size} tokens is {kernel_blocks} head-major kernel "
                f"blocks of {first.shape[2]}"
            )
        elif not content.heads_are_kv_heads:
            reason = "the attention backend packs K and V into head slots (num_head_slots)"
        elif span != block_stride:
            reason = f"pages are padded ({span} of {block_stride} bytes per block are KV)"
        if reason is not None:
            kind = "token_major"
    return KvDescription(regions, f"{kind}:{page}", physical, reason)
