"""End-to-end checksums of one room's bytes, for ``TransferConfig.verify_checksums``.

Prefill computes the checksum over what it wrote to one decode rank, decode over what landed in
its memory, and both walk the bytes in the same canonical order: every KV region in order, the
room's pages in request order (the page slice this writer owns, when TP sizes differ), then the
aux row. So the figure does not depend on how the writes were chunked or merged.

This runs on host memory (a numpy view of the registered region, one gather and one CRC-32 pass
per region). On a GPU the same walk would be a device kernel (for example a torch gather and
a reduction over int64 words on the region's device) with only the 4-byte result copied to the
host; kvbridge refuses to checksum device memory rather than read it from the host.
"""

from __future__ import annotations

import ctypes
import zlib
from collections.abc import Sequence

import numpy as np

from kvbridge.errors import ConfigError
from kvbridge.types import MemoryRegion


def _view(region: MemoryRegion) -> np.ndarray:
    if region.device != "cpu":
        raise ConfigError(
            f"verify_checksums reads host memory, but a region is on {region.device}; "
            "turn verify_checksums off for device memory"
        )
    raw = (ctypes.c_uint8 * region.length).from_address(region.addr)
    return np.ctypeslib.as_array(raw).reshape(region.num_items, region.item_bytes)


def room_checksum(
    kv_regions: Sequence[MemoryRegion],
    aux_regions: Sequence[MemoryRegion],
    pages: np.ndarray,
    aux_slot: int,
    offset: int = 0,
    length: int | None = None,
) -> int:
    """CRC-32 of ``pages`` (bytes ``offset .. offset+length`` of each) and aux row ``aux_slot``."""
    crc = 0
    pages = np.asarray(pages, dtype=np.int64)
    for region in kv_regions:
        end = region.item_bytes if length is None else offset + length
        chunk = np.ascontiguousarray(_view(region)[pages, offset:end])
        crc = zlib.crc32(chunk.data, crc)
    for region in aux_regions:
        row = np.ascontiguousarray(_view(region)[aux_slot])
        crc = zlib.crc32(row.data, crc)
    return crc
