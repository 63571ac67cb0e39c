"""KV handoff inside vLLM against the raw transport, and time to first token of a disaggregated
pair against one plain vLLM instance: the tiny Llama on vLLM's CPU backend, in one run.

Runs in the vLLM environment (``.venv-vllm``). The servers are started with
adapters/vllm/tests/vllm_servers.py (``--max-model-len 512``, float32, eager, TP 1), the model
is ``kvbridge.testing.tiny_model`` built into a temp dir. Every request is a distinct random
prompt of ``--prompt-tokens`` tokens (near max-model-len, so neither side ever hits its
prefix cache) and asks for ``--max-tokens`` tokens, greedy, streamed. One plain instance is
started once and shared by every transport; for each transport:

- a pair (prefill + decode with KvbridgeConnector over that transport, vllm-router in
  Mooncake mode in front); ``--warmup`` requests to the pair and to the plain instance first;
- (a) KV handoff inside vLLM, per request: ``--requests`` sequential requests through the
  router; across each, the change of the decode instance's ``vllm:kvbridge_handoff_seconds``
  histogram (sum, count: decode ``add`` -> commit, one request in flight so the sum is that
  request's time) and of ``vllm:kvbridge_transferred_bytes_total`` (its KV bytes). Under
  concurrency (b) the mean per request comes from the same sums. Then, the pair stopped, the
  same bytes (same number of blocks, same block bytes per layer, one region per layer as
  vLLM's CPU KV cache is allocated) between a PrefillNode and a DecodeNode of that transport
  in two spawned processes, as the adapter wires them (SingleRankReducer, 1 ms step loop):
  kvbridge alone (decode ``add`` -> commit, one room at a time) and raw (benchmarks/handoff.py's
  ``RawPath``: the library's own write of those pages plus one aux row, on the connection
  kvbridge opened);
- (b) time to first token, client side (request sent -> first streamed chunk with text),
  through the router against the plain instance, the two alternating: the ``--requests``
  sequential requests above, then ``--batches`` batches of ``--concurrency`` requests at
  once.

Usage: .venv-vllm/bin/python benchmarks/vllm_handoff.py [--transports fake,mooncake,nixl]
       [--requests 20] [--warmup 3] [--concurrency 4] [--batches 3] [--prompt-tokens 500]
       [--max-tokens 4] [--raw-repeats N]
Writes benchmarks/results/vllm_handoff.md and vllm_handoff.json (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# vllm_servers lives with the adapter's tests; handoff.py (the raw paths) next to this file.
# Spawned children re-run this module's top level, so they find both too.
for _path in (ROOT / "adapters" / "vllm" / "tests", BENCH):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import vllm_servers as vs  # noqa: E402
from handoff import (  # noqa: E402
    RawPath,
    _config,
    _fake_raw_server,
    fail,
    hand_in,
    run_processes,
)
from results_file import notes_mark, write_results  # noqa: E402

log = logging.getLogger("vllm_handoff")
#: The results file keeps everything from this line on when the tables are rewritten.
NOTES_MARK = notes_mark("vllm_handoff.py")
MAX_MODEL_LEN = 512  # what vllm_servers.start_vllm passes
SLOTS = 8  # aux rows of the raw processes
POLL = 0.001  # the adapter's default poll_interval: its driver thread's step loop
#: Decode-instance series read across each request (vLLM's /metrics, engine labels dropped).
SERIES = {
    "handoff_sum": "vllm:kvbridge_handoff_seconds_sum",
    "handoff_count": "vllm:kvbridge_handoff_seconds_count",
    "bytes": "vllm:kvbridge_transferred_bytes_total",
    "failures": "vllm:kvbridge_num_failed_transfers_total",
    "external_tokens": 'vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}',
    "computed_tokens": 'vllm:prompt_tokens_by_source_total{source="local_compute"}',
    "cache_hit_tokens": 'vllm:prompt_tokens_by_source_total{source="local_cache_hit"}',
}


# -- HTTP ---------------------------------------------------------------------------------------


@dataclass
class Reply:
    ttft: float  # seconds, request sent -> first chunk with text
    total: float
    text: str
    prompt_tokens: int | None


class Prompts:
    """Distinct prompts of one length: a new seed for every request of the run."""

    def __init__(self, tokens: int) -> None:
        from kvbridge.testing.tiny_model import prompt

        self.tokens, self._prompt, self._seed = tokens, prompt, 0

    def next(self) -> str:
        self._seed += 1
        return str(self._prompt(self.tokens, 900_000 + self._seed))


async def stream(session: Any, base: str, model: Path, prompt: str, max_tokens: int) -> Reply:
    body = {
        "model": str(model),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text: list[str] = []
    ttft = None
    usage: dict[str, Any] = {}
    t0 = time.perf_counter()
    async with session.post(base + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {(await r.text())[:500]}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            piece = "".join(c.get("text") or "" for c in chunk.get("choices") or ())
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(piece)
            usage = chunk.get("usage") or usage
    total = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError(f"{base}: the stream carried no text")
    return Reply(ttft, total, "".join(text), usage.get("prompt_tokens"))


def snapshot(server: vs.Server) -> dict[str, float]:
    m = vs.metrics(server)
    return {k: m.get(name, 0.0) for k, name in SERIES.items()}


def settle(server: vs.Server, before: dict[str, float], n: int, timeout: float = 15.0) -> dict:
    """The decode series' change once ``n`` more handoffs (or failures) were recorded: vLLM
    ships connector stats with its scheduler stats, shortly after the step that saw them."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(server)
        delta = {k: now[k] - before[k] for k in now}
        if delta["handoff_count"] + delta["failures"] >= n or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def block_size(server: vs.Server) -> int:
    for key in vs.metrics(server):
        m = re.search(r'block_size="(\d+)"', key)
        if key.startswith("vllm:cache_config_info") and m:
            return int(m.group(1))
    raise RuntimeError(f"{server.name}: no block_size in vllm:cache_config_info")


# -- servers ------------------------------------------------------------------------------------


@dataclass
class Pair:
    prefill: vs.Server
    decode: vs.Server
    router: vs.Server


def start_pair(model: Path, logs: Path, transport: str, started: list[vs.Server]) -> Pair:
    """Prefill, decode and vllm-router; each is appended to ``started`` as soon as it runs."""
    boot = vs.free_port()
    prefill = vs.start_vllm(
        f"prefill-{transport}", model, logs, vs.kv_config("kv_producer", transport, boot)
    )
    started.append(prefill)
    decode = vs.start_vllm(
        f"decode-{transport}",
        model,
        logs,
        vs.kv_config("kv_consumer", transport, vs.free_port()),
    )
    started.append(decode)
    router = vs.start_router(prefill, decode, boot, "mooncake", logs)
    started.append(router)
    vs.wait_ready([prefill, decode, router])
    return Pair(prefill, decode, router)


def stop_all(servers: list[vs.Server]) -> None:
    for s in reversed(servers):
        try:
            vs.stop(s)
        except Exception:  # keep stopping the others
            log.exception("stopping %s", s.name)


# -- (a) and (b) through vLLM ------------------------------------------------------------------


async def through_vllm(
    args: argparse.Namespace, model: Path, single: vs.Server, pair: Pair, prompts: Prompts
) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {
        "ttft_seq": {"single": [], "pair": []},
        "ttft_conc": {"single": [], "pair": []},
        "handoff": [],
        "bytes": [],
        "batch_handoff_mean": [],
        "unmatched": 0,
        "prompt_tokens": set(),
    }
    totals = {k: 0.0 for k in SERIES}
    targets = {"single": single.url, "pair": pair.router.url}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        log.info("warm-up: %d requests to each", args.warmup)
        for _ in range(args.warmup):
            for url in targets.values():
                await stream(session, url, model, prompts.next(), args.max_tokens)
        log.info("sequential: %d requests to each, alternating", args.requests)
        for i in range(args.requests):
            for name in ("single", "pair") if i % 2 == 0 else ("pair", "single"):
                before = snapshot(pair.decode) if name == "pair" else None
                reply = await stream(session, targets[name], model, prompts.next(), args.max_tokens)
                out["ttft_seq"][name].append(reply.ttft)
                out["prompt_tokens"].add(reply.prompt_tokens)
                if before is None:
                    continue
                delta = settle(pair.decode, before, 1)
                for k, v in delta.items():
                    totals[k] += v
                if delta["handoff_count"] == 1 and delta["failures"] == 0:
                    out["handoff"].append(delta["handoff_sum"])
                    out["bytes"].append(delta["bytes"])
                else:
                    out["unmatched"] += 1
                    log.warning("request %d: decode handoff series moved by %s", i, delta)
            if (i + 1) % 5 == 0 or i + 1 == args.requests:
                log.info("  %d / %d", i + 1, args.requests)
        n = args.concurrency
        log.info("concurrent: %d batches of %d to each, alternating", args.batches, n)
        for b in range(args.batches):
            for name in ("single", "pair") if b % 2 == 0 else ("pair", "single"):
                before = snapshot(pair.decode) if name == "pair" else None
                batch = [prompts.next() for _ in range(n)]
                replies = await asyncio.gather(
                    *(stream(session, targets[name], model, p, args.max_tokens) for p in batch)
                )
                out["ttft_conc"][name] += [r.ttft for r in replies]
                if before is None:
                    continue
                delta = settle(pair.decode, before, n)
                for k, v in delta.items():
                    totals[k] += v
                if delta["handoff_count"]:
                    out["batch_handoff_mean"].append(delta["handoff_sum"] / delta["handoff_count"])
                if delta["handoff_count"] != n or delta["failures"]:
                    out["unmatched"] += 1
                    log.warning("batch %d: decode handoff series moved by %s", b, delta)
    out["decode_totals"] = totals
    out["prompt_tokens"] = sorted(t for t in out["prompt_tokens"] if t is not None)
    return out


# -- (a) the same bytes outside vLLM: kvbridge alone and raw -------------------------------------


def raw_prefill(args: dict[str, Any], barrier: Any, results: Any) -> None:
    out: dict[str, Any] = {"role": "prefill", "error": None, "raw": []}
    node = server = raw = None
    try:
        from kvbridge import AuxLayout, MemoryRegion, RankIdentity, Role
        from kvbridge.bootstrap.server import BootstrapServer
        from kvbridge.memory import aux_descriptors, kv_descriptors
        from kvbridge.protocol.prefill import PrefillRequest
        from kvbridge.runtime.collective import SingleRankReducer
        from kvbridge.runtime.prefill_node import PrefillNode
        from kvbridge.types import Descriptors

        blocks, item = args["blocks"], args["layer_block_bytes"]
        server = BootstrapServer("127.0.0.1", args["bootstrap_port"]).start()
        rng = np.random.default_rng(0)
        kv = [rng.integers(0, 256, (blocks, item), dtype=np.uint8) for _ in range(args["layers"])]
        aux = AuxLayout().allocate(SLOTS + 1)  # the last row stays zero: raw writes copy it
        kv_regions = tuple(MemoryRegion.of(a, item) for a in kv)
        aux_regions = (MemoryRegion.of(aux, aux.dtype.itemsize),)
        node = PrefillNode(
            config=_config(args["transport"]),
            rank=RankIdentity(Role.PREFILL, tp_rank=0, tp_size=1),
            kv_regions=kv_regions,
            aux_regions=aux_regions,
            reducer=SingleRankReducer(),
            bootstrap_addr=f"127.0.0.1:{args['bootstrap_port']}",
            page_size=args["block_size"],
            kv_dtype="uint8",
            kv_layout="head_sharded",
        )
        pages = np.arange(blocks, dtype=np.int64)
        rooms = list(range(1, args["warmup"] + args["repeats"] + 1))
        barrier.wait(timeout=120)
        node.add([PrefillRequest(r) for r in rooms])
        pending = set(rooms)
        deadline = time.monotonic() + args["timeout"]
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError("kvbridge rooms did not finish on prefill")
            result = node.step()
            for room in result.ready:
                slot = room % SLOTS
                aux[slot]["room"] = room
                node.send(room, pages, is_last=True, aux_slot=slot)
            pending -= set(result.finished)
            for a in result.aborted:
                raise RuntimeError(f"prefill room {a.room} aborted: {a.reason}")
            time.sleep(POLL)
        barrier.wait(timeout=120)  # decode committed everything
        peer = next(iter(node.session.rooms.decode_peers.values()))
        assert node.manager is not None
        raw = RawPath(args["transport"], node.manager.raw, peer, args["fake_raw_port"])
        d = Descriptors.concat(
            [
                kv_descriptors(kv_regions, peer.kv_regions, pages, pages),
                aux_descriptors(aux_regions, peer.aux_regions, SLOTS, 0),
            ]
        )
        for i in range(args["warmup"] + args["repeats"]):
            t0 = time.perf_counter()
            raw.transfer(d.src, d.dst, d.lengths)
            if i >= args["warmup"]:
                out["raw"].append(time.perf_counter() - t0)
        out["descriptors"] = len(d.lengths)
        barrier.wait(timeout=120)
    except Exception:
        fail(out, barrier)
    finally:
        hand_in(out, results, raw, node, server)


def raw_decode(args: dict[str, Any], barrier: Any, results: Any) -> None:
    out: dict[str, Any] = {"role": "decode", "error": None, "kvbridge": []}
    node = None
    stop = threading.Event()
    try:
        from kvbridge import AuxLayout, MemoryRegion, RankIdentity, Role
        from kvbridge.protocol.decode import DecodeRequest
        from kvbridge.runtime.collective import SingleRankReducer
        from kvbridge.runtime.decode_node import DecodeNode

        blocks, item = args["blocks"], args["layer_block_bytes"]
        listener = socket.create_server(("127.0.0.1", args["fake_raw_port"]))
        threading.Thread(target=_fake_raw_server, args=(listener, stop), daemon=True).start()
        kv = [np.zeros((blocks, item), dtype=np.uint8) for _ in range(args["layers"])]
        for layer in kv:
            layer.fill(1)  # resident, like vLLM's KV cache
        node = DecodeNode(
            config=_config(args["transport"]),
            rank=RankIdentity(Role.DECODE, tp_rank=0, tp_size=1),
            kv_regions=tuple(MemoryRegion.of(a, item) for a in kv),
            aux=AuxLayout().allocate(SLOTS),
            pages=None,  # the engine's pages, as the adapter passes vLLM's blocks
            reducer=SingleRankReducer(),
            page_size=args["block_size"],
            kv_dtype="uint8",
            kv_layout="head_sharded",
        )
        bootstrap = f"127.0.0.1:{args['bootstrap_port']}"
        pages = np.arange(blocks, dtype=np.int64)
        barrier.wait(timeout=120)
        deadline = time.monotonic() + args["timeout"]
        for room in range(1, args["warmup"] + args["repeats"] + 1):
            added = time.monotonic()
            node.add([DecodeRequest(room, blocks, bootstrap, pages=pages)])
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError("kvbridge rooms did not commit on decode")
                result = node.step()
                now = time.monotonic()
                for a in result.aborted:
                    raise RuntimeError(f"decode room {a.room} aborted: {a.reason}")
                if any(c.room == room for c in result.committed):
                    break
                time.sleep(POLL)
            if room > args["warmup"]:
                out["kvbridge"].append(now - added)
        barrier.wait(timeout=120)  # prefill runs the raw writes now
        barrier.wait(timeout=args["timeout"])
    except Exception:
        fail(out, barrier)
    finally:
        stop.set()
        hand_in(out, results, node)


def outside_vllm(transport: str, geometry: dict[str, int], args: argparse.Namespace) -> dict:
    """kvbridge alone and raw, the same bytes, prefill and decode in two spawned processes."""
    ctx = multiprocessing.get_context("spawn")
    common = {
        **geometry,
        "transport": transport,
        "bootstrap_port": vs.free_port(),
        "fake_raw_port": vs.free_port(),
        "warmup": args.warmup,
        "repeats": args.raw_repeats or args.requests,
        "timeout": args.raw_timeout,
    }
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(common, barrier, results), daemon=True)
        for target in (raw_prefill, raw_decode)
    ]
    outs = run_processes(procs, results, args.raw_timeout + 60, f"{transport}: the raw processes")
    by_role = {o["role"]: o for o in outs}
    return {
        "kvbridge": by_role["decode"]["kvbridge"],
        "raw": by_role["prefill"]["raw"],
        "raw_descriptors": by_role["prefill"]["descriptors"],
    }


# -- driver -------------------------------------------------------------------------------------


def _q(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": _q(values, 50) * 1e3,
        "p90": _q(values, 90) * 1e3,
        "mean": float(np.mean(values)) * 1e3 if values else float("nan"),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def geometry_of(model: Path, block: int, kv_bytes: float) -> dict[str, int]:
    """Blocks and bytes per block of one request's KV, as vLLM's CPU KV cache holds them:
    one tensor per layer, ``[blocks, kv_heads, block_size, 2 * head_dim]`` float32."""
    cfg = json.loads((model / "config.json").read_text())
    heads = int(cfg["num_key_value_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    layer_block = heads * block * 2 * head_dim * 4
    blocks = kv_bytes / (layers * layer_block)
    if blocks != int(blocks) or blocks < 1:
        raise RuntimeError(
            f"{kv_bytes:.0f} KV bytes per request is not whole blocks of {layers} x "
            f"{layer_block} bytes: the KV cache layout is not the expected one"
        )
    return {
        "layers": layers,
        "layer_block_bytes": layer_block,
        "block_size": block,
        "blocks": int(blocks),
    }


def measure(
    transport: str,
    args: argparse.Namespace,
    model: Path,
    logs: Path,
    single: vs.Server,
    prompts: Prompts,
) -> dict[str, Any]:
    load = os.getloadavg()[0]
    started: list[vs.Server] = []
    t0 = time.monotonic()
    try:
        log.info("%s: starting prefill, decode and vllm-router", transport)
        pair = start_pair(model, logs, transport, started)
        log.info("%s: up in %.0f s", transport, time.monotonic() - t0)
        block = block_size(pair.decode)
        got = asyncio.run(through_vllm(args, model, single, pair, prompts))
    finally:
        stop_all(started)
    if not got["bytes"]:
        raise RuntimeError(f"{transport}: no request gave a clean handoff figure")
    kv_bytes = float(np.median(got["bytes"]))
    geometry = geometry_of(model, block, kv_bytes)
    log.info(
        "%s: %.0f KiB per request (%d blocks x %d layers x %d B); kvbridge alone and raw",
        transport,
        kv_bytes / 1024,
        geometry["blocks"],
        geometry["layers"],
        geometry["layer_block_bytes"],
    )
    outside = outside_vllm(transport, geometry, args)
    handoff, alone, raw = _ms(got["handoff"]), _ms(outside["kvbridge"]), _ms(outside["raw"])
    ttft: dict[str, Any] = {}
    for mode in ("seq", "conc"):
        single_ms, pair_ms = _ms(got[f"ttft_{mode}"]["single"]), _ms(got[f"ttft_{mode}"]["pair"])
        ttft[mode] = {
            "single": single_ms,
            "pair": pair_ms,
            "ratio_p50": _ratio(pair_ms["p50"], single_ms["p50"]),
            "ratio_p90": _ratio(pair_ms["p90"], single_ms["p90"]),
        }
    return {
        "transport": transport,
        "prompt_tokens": got["prompt_tokens"],
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        **geometry,
        "kv_bytes": kv_bytes,
        "raw_descriptors": outside["raw_descriptors"],
        "handoff_ms": handoff,
        "handoff_conc_mean_ms": float(np.mean(got["batch_handoff_mean"])) * 1e3
        if got["batch_handoff_mean"]
        else float("nan"),
        "kvbridge_alone_ms": alone,
        "raw_ms": raw,
        "handoff_over_raw_p50": _ratio(handoff["p50"], raw["p50"]),
        "handoff_over_raw_p90": _ratio(handoff["p90"], raw["p90"]),
        "alone_over_raw_p50": _ratio(alone["p50"], raw["p50"]),
        "ttft": ttft,
        "unmatched": got["unmatched"],
        "decode_totals": got["decode_totals"],
        "samples_s": {
            "handoff": got["handoff"],
            "kvbridge_alone": outside["kvbridge"],
            "raw": outside["raw"],
            "ttft_seq": got["ttft_seq"],
            "ttft_conc": got["ttft_conc"],
        },
        "seconds": round(time.monotonic() - t0, 1),
        "load_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
    }


def render(rows: list[dict[str, Any]], command: str, failed: dict[str, str]) -> str:
    lines = [
        "# KV handoff inside vLLM vs the raw transport; TTFT disaggregated vs one instance",
        "",
        f"Measured {datetime.date.today()} with `{command}` (2-vCPU VM shared with other "
        "jobs: timings are noisy; every ratio compares figures from the same run). What "
        "each column is: adapters/vllm/README.md, section Performance.",
    ]
    if rows:
        r0 = rows[0]
        lines += [
            "",
            f"Tiny Llama (vLLM CPU, float32, TP 1), prompts of "
            f"{'/'.join(map(str, r0['prompt_tokens']))} tokens, "
            f"{r0['max_tokens']} generated, streamed; KV per request "
            f"{r0['kv_bytes'] / 1024:.0f} KiB = {r0['blocks']} blocks x {r0['layers']} layers x "
            f"{r0['layer_block_bytes'] // 1024} KiB (block size {r0['block_size']} tokens).",
        ]
    lines += [
        "",
        "## (a) KV handoff per request (ms)",
        "",
        "| transport | n | in vLLM p50 | p90 | in vLLM, concurrent mean | kvbridge alone p50 "
        "| p90 | raw p50 | p90 | in vLLM / raw p50 | p90 | kvbridge alone / raw p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h, a, w = r["handoff_ms"], r["kvbridge_alone_ms"], r["raw_ms"]
        lines.append(
            f"| {r['transport']} | {h['n']} | {h['p50']:.2f} | {h['p90']:.2f} "
            f"| {r['handoff_conc_mean_ms']:.2f} | {a['p50']:.2f} | {a['p90']:.2f} "
            f"| {w['p50']:.3f} | {w['p90']:.3f} | {r['handoff_over_raw_p50']:.1f} "
            f"| {r['handoff_over_raw_p90']:.1f} | {r['alone_over_raw_p50']:.1f} |"
        )
    lines += [
        "",
        "## (b) time to first token, streaming (ms)",
        "",
        "| transport | requests | n each | one instance p50 | p90 | disaggregated p50 | p90 "
        "| disaggregated / one p50 | p90 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for mode, label in (("seq", "sequential"), ("conc", f"{r['concurrency']} at once")):
            t = r["ttft"][mode]
            s, p = t["single"], t["pair"]
            lines.append(
                f"| {r['transport']} | {label} | {p['n']} | {s['p50']:.1f} | {s['p90']:.1f} "
                f"| {p['p50']:.1f} | {p['p90']:.1f} | {t['ratio_p50']:.2f} "
                f"| {t['ratio_p90']:.2f} |"
            )
    checks = [
        f"{r['transport']}: {r['decode_totals']['computed_tokens']:.0f} prompt tokens computed "
        f"on decode, {r['decode_totals']['cache_hit_tokens']:.0f} from its prefix cache, "
        f"{r['decode_totals']['failures']:.0f} failed transfers, {r['unmatched']} requests "
        "or batches without a clean handoff figure"
        for r in rows
    ]
    if checks:
        lines += ["", "Decode instance over the measured requests: " + "; ".join(checks) + "."]
    loads = "; ".join(
        f"{r['transport']} {r['load_1m'][0]:.2f} / {r['load_1m'][1]:.2f} ({r['seconds']:.0f} s)"
        for r in rows
    )
    if loads:
        lines += ["", f"Load average (1 min) at the start / end of each transport: {loads}."]
    for name, why in failed.items():
        lines += ["", f"**{name} failed**: {why}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--transports",
        nargs="+",
        default=["fake", "mooncake", "nixl"],
        help="transports, space or comma separated",
    )
    parser.add_argument("--requests", type=int, default=20, help="sequential, to each side")
    parser.add_argument("--warmup", type=int, default=3, help="requests to each side first")
    parser.add_argument("--concurrency", type=int, default=4, help="requests per batch")
    parser.add_argument("--batches", type=int, default=3, help="concurrent batches, each side")
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument(
        "--raw-repeats",
        type=int,
        default=0,
        help="kvbridge-alone and raw transfers (0: --requests)",
    )
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--raw-timeout", type=float, default=180.0)
    parser.add_argument("--logs", type=Path, help="keep the servers' logs here (default: temp)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default="vllm_handoff", help="results file stem")
    args = parser.parse_args(argv)
    args.transports = [t for item in args.transports for t in item.split(",") if t]
    if args.prompt_tokens + args.max_tokens > MAX_MODEL_LEN:
        parser.error(f"--prompt-tokens + --max-tokens must fit max-model-len {MAX_MODEL_LEN}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    os.environ.setdefault("UCX_MODULES", "^ib")
    # SIGTERM unwinds like Ctrl-C, so every server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from kvbridge.testing.tiny_model import build

    work = Path(tempfile.mkdtemp(prefix="vllm-handoff-"))
    logs = args.logs or work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    single = None
    began = time.monotonic()
    ok = False
    try:
        model = build(work / "tiny-llama")
        log.info("model in %s, server logs in %s; starting the plain instance", model, logs)
        single = vs.start_vllm("single", model, logs)
        vs.wait_ready([single])
        prompts = Prompts(args.prompt_tokens)
        for transport in args.transports:
            try:
                rows.append(measure(transport, args, model, logs, single, prompts))
            except Exception as exc:  # recorded; the other transports still run
                log.exception("%s failed (server logs in %s)", transport, logs)
                failed[transport] = str(exc).splitlines()[0] if str(exc) else repr(exc)
        ok = not failed
    finally:
        stop_all([single] if single is not None else [])
        if args.logs is None and not ok:  # keep the logs, drop the model
            shutil.rmtree(work / "tiny-llama", ignore_errors=True)
            log.info("server logs kept in %s", logs)
        else:
            shutil.rmtree(work, ignore_errors=True)
    log.info("done in %.0f s", time.monotonic() - began)
    command = ".venv-vllm/bin/python benchmarks/vllm_handoff.py " + " ".join(sys.argv[1:])
    text = render(rows, command.strip(), failed)
    print(text)
    if not args.no_write and rows:
        write_results(args.out, text, rows, NOTES_MARK)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
