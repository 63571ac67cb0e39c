"""What ``verify_checksums`` costs: seconds per GB of KV for one side's checksum walk.

Both sides walk the same bytes once (prefill its source pages, decode its destination pages),
so the figure is paid twice per request, once on each side, on the scheduler thread. Measured
against a plain copy of the same gathered pages (numpy fancy indexing, the gather the walk does
anyway) and memcpy of the same number of bytes, in the same run.

    python benchmarks/checksum.py [--repeats 7] [--out benchmarks/results/checksum.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvbridge.checksum import room_checksum
from kvbridge.types import MemoryRegion

RESULTS = Path(__file__).parent / "results"
PAGE = 64 << 10


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "checksum.md")
    args = parser.parse_args()
    rows = []
    for total_mib in (1, 16, 64, 256):
        regions = 2
        pages_per_region = max(total_mib * (1 << 20) // (regions * PAGE), 1)
        kv = [
            np.random.default_rng(r).integers(0, 256, (pages_per_region * 2, PAGE), np.uint8)
            for r in range(regions)
        ]
        aux = np.zeros((4, 64), dtype=np.uint8)
        kv_regions = [MemoryRegion.of(a, PAGE) for a in kv]
        aux_regions = [MemoryRegion.of(aux, 64)]
        pages = np.random.default_rng(9).permutation(pages_per_region * 2)[:pages_per_region]
        nbytes = regions * pages_per_region * PAGE
        dst = np.empty(nbytes, dtype=np.uint8)
        src = np.concatenate([a[:pages_per_region].reshape(-1) for a in kv])

        t_crc = _median_seconds(
            lambda r=kv_regions, a=aux_regions, p=pages: room_checksum(r, a, p, 1), args.repeats
        )
        t_gather = _median_seconds(lambda k=kv, p=pages: [x[p] for x in k], args.repeats)
        t_copy = _median_seconds(lambda d=dst, s=src: np.copyto(d, s), args.repeats)
        gb = nbytes / 1e9
        rows.append(
            f"| {total_mib} | {t_crc * 1e3:.2f} | {t_crc / gb:.3f} | {gb / t_crc:.2f} | "
            f"{gb / t_gather:.2f} | {gb / t_copy:.2f} | {t_crc / t_copy:.1f}x |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# verify_checksums: cost of one side's checksum walk",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/checksum.py "
            f"--repeats {args.repeats}` (2-vCPU VM; medians; 64 KiB pages, 2 KV regions, pages "
            "shuffled). Each side pays this once per request, on its scheduler thread.",
            "",
            "| MiB per rank | checksum ms | s per GB | checksum GB/s | gather-only GB/s | "
            "memcpy GB/s | checksum / memcpy |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
