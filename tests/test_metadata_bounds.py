"""A decode rank's metadata is checked against the memory that rank registered: every refusal
names what did not fit, and a metadata that fits is accepted (``metadata_problem``, with the
peer's bounds worked out once at registration)."""

from __future__ import annotations

import numpy as np
import pytest

from kvbridge.protocol.plan import DecodeMetadata, DecodePeer
from kvbridge.protocol.prefill_rooms import metadata_problem
from kvbridge.types import MemoryRegion

PAGE, ROW, PAGES, ROWS = 4096, 32, 8, 4


def regions(base: int, count: int, item: int, items: int) -> tuple[MemoryRegion, ...]:
    return tuple(
        MemoryRegion(addr=(base + i) << 24, length=item * items, item_bytes=item)
        for i in range(count)
    )


KV = regions(1, 2, PAGE, PAGES)
AUX = regions(9, 1, ROW, ROWS)
PEER = DecodePeer({"id": "d"}, regions(17, 2, PAGE, PAGES), regions(25, 1, ROW, ROWS))


def meta(pages: list[int], slot: int = 0, **changes: object) -> DecodeMetadata:
    return DecodeMetadata(7, "d0", np.array(pages, dtype=np.int64), slot, **changes)


def test_metadata_that_fits_is_accepted() -> None:
    assert metadata_problem(meta([0, PAGES - 1], ROWS - 1), PEER, KV, AUX) is None
    assert metadata_problem(meta([], 0), PEER, KV, AUX) is None
    assert metadata_problem(meta([3], 1, page_slice=(0, 64, 128)), PEER, KV, AUX) is None
    # a rank that only takes part writes nothing: nothing to check
    assert metadata_problem(meta([10**9], -5, writes=False), PEER, KV, AUX) is None


@pytest.mark.parametrize(
    ("bad", "peer", "expected"),
    [
        (meta([0, PAGES]), PEER, f"page {PAGES} is out of range (decode registered {PAGES}"),
        (meta([0], ROWS), PEER, f"aux slot {ROWS} is out of range (decode registered {ROWS}"),
        (meta([0], -1), PEER, "aux slot -1 is out of range"),
        (meta([0]), DecodePeer({}, PEER.kv_regions, ()), "decode registered no aux rows"),
        (
            meta([0]),
            DecodePeer({}, PEER.kv_regions, regions(25, 1, ROW // 2, ROWS)),
            f"decode registered aux rows of [{ROW // 2}] bytes, this prefill writes rows of "
            f"[{ROW}]",
        ),
        (meta([0], page_slice=(0, 0, 0)), PEER, "page slice (src 0, dst 0, 0 bytes) does not"),
        (
            meta([0], page_slice=(0, PAGE - 64, 128)),
            PEER,
            f"does not fit pages of {PAGE} / {PAGE} bytes",
        ),
    ],
)
def test_metadata_that_does_not_fit_is_refused_naming_why(
    bad: DecodeMetadata, peer: DecodePeer, expected: str
) -> None:
    problem = metadata_problem(bad, peer, KV, AUX)
    assert problem is not None and expected in problem


def test_the_bounds_are_those_of_the_smallest_registered_region() -> None:
    small = DecodePeer(
        {}, regions(17, 1, PAGE, PAGES) + regions(18, 1, PAGE, PAGES // 2), PEER.aux_regions
    )
    assert small.bounds.kv_pages == PAGES // 2
    assert metadata_problem(meta([PAGES // 2 - 1]), small, KV, AUX) is None
    assert "out of range" in (metadata_problem(meta([PAGES // 2]), small, KV, AUX) or "")
