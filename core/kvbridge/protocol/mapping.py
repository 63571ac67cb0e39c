"""Rank mapping: which prefill ranks write which part of each page into which decode rank.

Three KV layouts are supported:

``replicated``
    Every TP rank holds the whole KV (MLA-style latent cache). Decode rank ``d`` reads whole
    pages from prefill TP rank ``d % prefill_tp``; any TP sizes combine.
``head_sharded``
    KV heads are split evenly over TP ranks (MHA/GQA). With equal TP sizes pages map one to
    one. With different TP sizes one side's page holds a contiguous *slice* of the other
    side's page, so pages must be stored head-major (``[heads, tokens, head_dim]`` within a
    page) and the larger TP size must be a multiple of the smaller.

``token_major``
    KV heads are split over TP ranks but a page holds several tokens with all of this rank's
    heads each (``[tokens, heads, head_dim]``, SGLang's paged MHA pool): a rank's heads are
    not contiguous in a page, so only equal TP sizes combine, page to page.

A layout may name the engine's page interior after a colon (``head_sharded:vllm LBHNC``): the
mapping reads only the part before it, and prefill and decode must state the same text (the
decode side compares ``kv_layout`` verbatim), so two engines whose pages map alike but hold
their bytes in another order are refused instead of silently paired.

With context parallelism on prefill only CP rank 0 of each TP shard (the authoritative rank,
holding the gathered KV) is a transfer target; the other CP ranks send nothing and take part
in the reductions only.
"""

from __future__ import annotations

import attrs

from kvbridge.errors import ConfigError

KV_LAYOUTS = ("replicated", "head_sharded", "token_major")
AUTHORITATIVE_CP_RANK = 0


@attrs.frozen
class Route:
    """Prefill TP rank ``prefill`` writes into decode TP rank ``decode``: for every page,
    ``length`` bytes from ``src_offset`` of the source page to ``dst_offset`` of the
    destination page."""

    prefill: int
    decode: int
    src_offset: int
    dst_offset: int
    length: int

    @property
    def whole_pages(self) -> bool:
        return self.src_offset == 0 and self.dst_offset == 0


def layout_kind(kv_layout: str) -> str:
    """The mapping kind of ``kv_layout`` (one of :data:`KV_LAYOUTS`): the part before ``:``."""
    kind = kv_layout.partition(":")[0]
    if kind not in KV_LAYOUTS:
        raise ConfigError(
            f"kv_layout must be one of {KV_LAYOUTS}, optionally followed by ':' and the "
            f"engine's page description, got {kv_layout!r}"
        )
    return kind


def routes(
    prefill_tp: int,
    decode_tp: int,
    prefill_page_bytes: int,
    decode_page_bytes: int,
    kv_layout: str,
) -> tuple[Route, ...]:
    """Every (prefill rank, decode rank) pair that moves bytes, with its page slice."""
    kind = layout_kind(kv_layout)
    if prefill_tp < 1 or decode_tp < 1:
        raise ConfigError(f"TP sizes must be >= 1, got prefill {prefill_tp}, decode {decode_tp}")
    if kind == "token_major" and prefill_tp != decode_tp:
        raise ConfigError(
            f"{kv_layout} KV (a TP rank's heads are not one contiguous slice of a page) needs "
            f"equal TP sizes, got prefill {prefill_tp} and decode {decode_tp}: use the same TP "
            f"size, or a head-major page layout (head_sharded)"
        )
    if kind == "replicated" or prefill_tp == decode_tp:
        if prefill_page_bytes != decode_page_bytes:
            raise ConfigError(
                f"page size differs: prefill {prefill_page_bytes} bytes, decode "
                f"{decode_page_bytes} bytes"
            )
        if kind == "replicated":
            return tuple(
                Route(d % prefill_tp, d, 0, 0, decode_page_bytes) for d in range(decode_tp)
            )
        return tuple(Route(d, d, 0, 0, decode_page_bytes) for d in range(decode_tp))
    if prefill_tp > decode_tp:
        ratio, rem = divmod(prefill_tp, decode_tp)
        if rem or decode_page_bytes != ratio * prefill_page_bytes:
            raise ConfigError(
                f"head_sharded KV with prefill TP {prefill_tp} > decode TP {decode_tp} needs "
                f"a multiple and decode pages {prefill_tp // max(decode_tp, 1)}x prefill pages; "
                f"got {prefill_page_bytes} and {decode_page_bytes} bytes"
            )
        return tuple(
            Route(p, p // ratio, 0, (p % ratio) * prefill_page_bytes, prefill_page_bytes)
            for p in range(prefill_tp)
        )
    ratio, rem = divmod(decode_tp, prefill_tp)
    if rem or prefill_page_bytes != ratio * decode_page_bytes:
        raise ConfigError(
            f"head_sharded KV with prefill TP {prefill_tp} < decode TP {decode_tp} needs a "
            f"multiple and prefill pages {ratio}x decode pages; got {prefill_page_bytes} and "
            f"{decode_page_bytes} bytes"
        )
    return tuple(
        Route(d // ratio, d, (d % ratio) * decode_page_bytes, 0, decode_page_bytes)
        for d in range(decode_tp)
    )


def sources_of(decode_rank: int, all_routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """Routes into one decode rank: it waits for a completion from each source."""
    return tuple(r for r in all_routes if r.decode == decode_rank)


def targets_of(prefill_rank: int, all_routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """Routes out of one prefill TP rank (empty: it sends nothing for any room)."""
    return tuple(r for r in all_routes if r.prefill == prefill_rank)
