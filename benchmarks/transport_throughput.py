"""Throughput of one request's KV through kvbridge vs the raw library vs memcpy.

For each transport and request size (pages of 64 KiB, destination pages shuffled so runs do not
merge), measured in one run with the receiver in another process:

- kvbridge: descriptors built by the core, ``sender_send`` through the plugin dispatch, and
  batched ``sender_poll`` until Success (what an engine pays);
- raw: the same descriptors straight into the library's own batched call on the same
  registered memory (Mooncake ``batch_transfer_sync_write``; NIXL ``initialize_xfer`` +
  ``transfer`` + ``check_xfer_state``);
- memcpy: ``numpy.copyto`` of the same bytes into a reused buffer (the ceiling).

Usage: python benchmarks/transport_throughput.py [--transports mooncake nixl] [--sizes-mib 64 256]
Writes benchmarks/results/transport_throughput.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
PAGE = 64 << 10
POLL_INTERVAL = 0.001


def raw_transfer(name: str, manager, session_or_agent: str, src, dst, lengths) -> None:
    if name == "mooncake":
        # Mooncake's TCP transport rejects batches that overfill its lane queue, so the raw
        # path slices exactly like the plugin does (same max_batch).
        step = int(manager.options["max_batch"])
        for i in range(0, len(src), step):
            ret = manager.engine.batch_transfer_sync_write(
                session_or_agent,
                src[i : i + step].tolist(),
                dst[i : i + step].tolist(),
                lengths[i : i + step].tolist(),
            )
            if ret != 0:
                raise RuntimeError(f"raw mooncake write failed: {ret}")
    elif name == "nixl":
        agent = manager.agent
        handle = agent.initialize_xfer(
            "WRITE", manager._descs(src, lengths), manager._descs(dst, lengths), session_or_agent
        )
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"raw nixl transfer ended in {state}")
    else:
        raise ValueError(f"no raw path for {name}")


def measure(name: str, size: int, repeats: int) -> dict:
    from kvbridge import KVPoll, PeerWrite, RankIdentity, Role, SendChunk
    from kvbridge.buffers import RankBuffers
    from kvbridge.memory import kv_descriptors
    from kvbridge.testing.remote import RemoteReceiver
    from kvbridge.testing.rig import load

    pages = size // PAGE
    transport, config = load(name)
    remote = RemoteReceiver(name, {}, num_regions=1, num_pages=pages, page_bytes=PAGE, num_slots=4)
    local = RankBuffers.allocate(num_regions=1, num_pages=pages, page_bytes=PAGE, num_slots=4)
    local.kv[0][:] = np.random.default_rng(0).integers(0, 255, local.kv[0].shape, np.uint8)
    sender = transport.create_manager(
        config, RankIdentity(Role.PREFILL), local.kv_regions, local.aux_regions
    )
    ceiling = np.empty_like(local.kv[0])
    src_pages = np.arange(pages, dtype=np.int64)
    dst_pages = np.random.default_rng(1).permutation(pages).astype(np.int64)
    peer = remote.endpoint
    peer_id = peer.get("session") or peer.get("agent")
    times: dict[str, list[float]] = {"kvbridge": [], "raw": [], "memcpy": []}
    try:
        for rep in range(repeats + 1):  # the first round warms up (page faults, connections)
            room = 1000 + rep
            remote.open(room, sender.endpoint, dst_pages, 0)
            t0 = time.perf_counter()
            d = kv_descriptors(local.kv_regions, remote.kv_regions, src_pages, dst_pages)
            sender.sender_construct(room)
            sender.sender_init(room, (peer,))
            sender.sender_send(room, SendChunk((PeerWrite(0, d),), is_last=True))
            rooms = np.array([room], dtype=np.uint64)
            while True:
                status = sender.sender_poll(rooms)[0][0]
                if status in (KVPoll.Success, KVPoll.Failed):
                    break
                time.sleep(POLL_INTERVAL)  # a scheduler polls once per step, it does not spin
            t1 = time.perf_counter()
            if status != KVPoll.Success:
                raise RuntimeError(f"kvbridge transfer failed: {sender.sender_poll(rooms)[1]}")
            sender.sender_clear(room)

            t2 = time.perf_counter()
            raw_transfer(name, sender.raw, peer_id, d.src, d.dst, d.lengths)
            t3 = time.perf_counter()

            t4 = time.perf_counter()
            np.copyto(ceiling, local.kv[0])
            t5 = time.perf_counter()
            if rep:
                times["kvbridge"].append(t1 - t0)
                times["raw"].append(t3 - t2)
                times["memcpy"].append(t5 - t4)
    finally:
        sender.close()
        remote.close()
    gbps = {k: size / statistics.median(v) / 1e9 for k, v in times.items()}
    return {
        "transport": name,
        "size_mib": size >> 20,
        "descriptors": int(pages),
        **{f"{k}_gbps": round(v, 3) for k, v in gbps.items()},
        "kvbridge_vs_raw": round(gbps["kvbridge"] / gbps["raw"], 3),
        "raw_vs_memcpy": round(gbps["raw"] / gbps["memcpy"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transports", nargs="+", default=["mooncake", "nixl"])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    os.environ.setdefault("UCX_MODULES", "^ib")
    rows = []
    for name in args.transports:
        for mib in args.sizes_mib:
            print(f"measuring {name} {mib} MiB ...", file=sys.stderr, flush=True)
            rows.append(measure(name, mib << 20, args.repeats))
    lines = [
        "# Transport throughput: kvbridge vs raw library vs memcpy",
        "",
        f"Measured {datetime.date.today()} with `python benchmarks/transport_throughput.py` "
        f"(median of {args.repeats} after a warm-up; receiver in another process on loopback; "
        "64 KiB pages, destination pages shuffled, so one descriptor per page; 2-core VM).",
        "",
        "| transport | MiB | descriptors | kvbridge GB/s | raw GB/s | memcpy GB/s "
        "| kvbridge / raw | raw / memcpy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['transport']} | {r['size_mib']} | {r['descriptors']} | "
            f"{r['kvbridge_gbps']:.2f} | {r['raw_gbps']:.2f} | {r['memcpy_gbps']:.2f} | "
            f"{r['kvbridge_vs_raw']:.2f} | {r['raw_vs_memcpy']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "transport_throughput.md").write_text(text)
        (RESULTS / "transport_throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
