"""Rank mapping moves exactly the right bytes for every TP combination and KV layout."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.errors import ConfigError
from kvbridge.memory import kv_descriptors
from kvbridge.protocol.mapping import routes, sources_of, targets_of
from kvbridge.testing.buffers import RankBuffers

HEAD = 64


def shard_buffers(tp: int, heads: int, num_pages: int, layout: str) -> list[RankBuffers]:
    out = []
    for rank in range(tp):
        if layout == "replicated":
            b = RankBuffers.allocate(num_regions=2, num_pages=num_pages, page_bytes=heads * HEAD)
        else:
            b = RankBuffers.allocate(
                num_regions=2, num_pages=num_pages, page_bytes=heads // tp * HEAD
            )
            b.shard = (rank * b.page_bytes, heads * HEAD)
        out.append(b)
    return out


@settings(max_examples=60, deadline=None)
@given(
    prefill_tp=st.sampled_from([1, 2, 4]),
    decode_tp=st.sampled_from([1, 2, 4]),
    layout=st.sampled_from(["replicated", "head_sharded"]),
    data=st.data(),
)
def test_every_decode_rank_ends_up_with_exactly_its_bytes(
    prefill_tp: int, decode_tp: int, layout: str, data: st.DataObject
) -> None:
    heads, room = 8, 4242
    n = data.draw(st.integers(1, 6))
    src_pages = np.array(data.draw(st.permutations(range(8)))[:n], dtype=np.int64)
    dst_pages = np.array(data.draw(st.permutations(range(8)))[:n], dtype=np.int64)
    prefill = shard_buffers(prefill_tp, heads, 8, layout)
    decode = shard_buffers(decode_tp, heads, 8, layout)
    for b in prefill:
        b.fill(room, src_pages)
    all_routes = routes(prefill_tp, decode_tp, prefill[0].page_bytes, decode[0].page_bytes, layout)
    for r in all_routes:
        d = kv_descriptors(
            prefill[r.prefill].kv_regions,
            decode[r.decode].kv_regions,
            src_pages,
            dst_pages,
            src_offset=r.src_offset,
            dst_offset=r.dst_offset,
            length=r.length,
        )
        for s, t, length in zip(d.src.tolist(), d.dst.tolist(), d.lengths.tolist()):
            ctypes.memmove(t, s, length)
    for b in decode:
        assert b.mismatches(room, dst_pages) == []
    # Every decode rank has a source; every prefill rank either writes or is told it need not.
    assert all(sources_of(d, all_routes) for d in range(decode_tp))
    writers = {r.prefill for r in all_routes}
    assert writers == {p for p in range(prefill_tp) if targets_of(p, all_routes)}


def test_head_sharded_with_incompatible_sizes_is_refused_with_both_values() -> None:
    with pytest.raises(ConfigError, match=r"prefill TP 3 > decode TP 2"):
        routes(3, 2, 512, 768, "head_sharded")
    with pytest.raises(ConfigError, match=r"page size differs: prefill 512 bytes, decode 256"):
        routes(2, 2, 512, 256, "head_sharded")
    with pytest.raises(ConfigError, match="kv_layout"):
        routes(1, 1, 1, 1, "paged-whatever")


def test_token_major_pages_map_one_to_one_and_refuse_unequal_tp() -> None:
    assert routes(2, 2, 4096, 4096, "token_major") == routes(2, 2, 4096, 4096, "head_sharded")
    with pytest.raises(ConfigError, match=r"token_major .* prefill 2 and decode 1"):
        routes(2, 1, 2048, 4096, "token_major")
    with pytest.raises(ConfigError, match="page size differs"):
        routes(1, 1, 2048, 4096, "token_major")


def test_an_engine_page_description_after_the_kind_maps_like_the_kind() -> None:
    for kind in ("replicated", "head_sharded", "token_major"):
        assert routes(2, 2, 4096, 4096, f"{kind}:vllm LBHNC 128B") == routes(2, 2, 4096, 4096, kind)
    assert routes(1, 2, 4096, 2048, "head_sharded:vllm LBHNC") == routes(
        1, 2, 4096, 2048, "head_sharded"
    )
    with pytest.raises(ConfigError, match=r"token_major:vllm BLNHC KV .* prefill 1 and decode 2"):
        routes(1, 2, 4096, 4096, "token_major:vllm BLNHC")
    with pytest.raises(ConfigError, match="optionally followed by ':'"):
        routes(1, 1, 1, 1, "head-sharded:vllm LBHNC")
