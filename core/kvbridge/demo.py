"""``kvbridge demo``: a real prefill instance and decode instance on one machine.

Prefill and decode ranks are separate processes with their own gloo groups; the bootstrap
server runs inside prefill rank 0; ranks talk over the control channel and move KV with the
chosen transport. Prefill fills each request's pages with a pattern derived from its room;
decode verifies every byte after commit. Every process ends on its own: workers exit when the
work is done, when told to stop, or when the parent disappears.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import os
import queue
import random
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np

from kvbridge.protocol.decode import FROM_OTHER_RANK
from kvbridge.runtime.collective import init_gloo

log = logging.getLogger("kvbridge.demo")
HEAD_BYTES = 512  # bytes per KV head per page; a page holds `heads` of them


@attrs.frozen
class DemoPlan:
    transport: str = "fake"
    transport_options: dict[str, Any] = attrs.field(factory=dict, hash=False)
    prefill_tp: int = 2
    prefill_cp: int = 1
    prefill_dp: int = 1
    decode_tp: int = 2
    requests: int = 64
    max_prompt_tokens: int = 2048
    page_size: int = 16  # tokens per page
    heads: int = 8  # KV heads in total, split over TP ranks (head-sharded layout)
    layers: int = 4  # KV regions per rank (K and V of `layers // 2` layers)
    arrivals_per_step: int = 4
    chunk_pages: int = 32  # pages sent per chunk (chunked prefill)
    seed: int = 0
    timeout: float = 600.0
    waiting_timeout: float = 120.0
    heartbeat_interval: float = 1.0
    heartbeat_max_misses: int = 3
    kill_prefill_after: int | None = None  # testing: kill prefill once this many committed
    #: Serve every process's kvbridge metrics (Prometheus) on this port while the demo runs.
    metrics_port: int | None = None

    def __attrs_post_init__(self) -> None:
        for name in (
            "prefill_tp",
            "prefill_cp",
            "prefill_dp",
            "decode_tp",
            "requests",
            "max_prompt_tokens",
            "page_size",
            "heads",
            "layers",
            "chunk_pages",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for tp in (self.prefill_tp, self.decode_tp):
            if self.heads % tp:
                raise ValueError(f"{self.heads} KV heads cannot be split over TP {tp}")
        big, small = max(self.prefill_tp, self.decode_tp), min(self.prefill_tp, self.decode_tp)
        if big % small:
            raise ValueError(
                f"prefill TP {self.prefill_tp} and decode TP {self.decode_tp}: "
                "the larger must be a multiple of the smaller"
            )
        if self.prefill_tp * self.prefill_cp > 4 or self.decode_tp > 4:
            log.warning("more than 4 ranks per gloo group oversubscribes small machines")

    def requests_list(self) -> list[tuple[int, int, int]]:
        """(room, prompt tokens, prefill DP rank): identical in every process."""
        rng = random.Random(self.seed)
        rooms: set[int] = set()
        out: list[tuple[int, int, int]] = []
        while len(out) < self.requests:
            room = rng.getrandbits(62) + 1
            if room in rooms:
                continue
            rooms.add(room)
            out.append(
                (room, rng.randint(1, self.max_prompt_tokens), rng.randrange(self.prefill_dp))
            )
        return out

    def pages_of(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def pool_pages(self) -> int:
        # Room for a quarter of the requests at the longest prompt: enough to keep transfers
        # overlapping, few enough that FIFO allocation really waits for memory sometimes.
        return max(self.pages_of(self.max_prompt_tokens) * max(self.requests // 4, 2), 64)


def _config(plan: DemoPlan) -> Any:
    from kvbridge import TransferConfig

    return TransferConfig(
        transport=plan.transport,
        transport_options=dict(plan.transport_options),
        waiting_timeout=plan.waiting_timeout,
        bootstrap_timeout=plan.waiting_timeout,
        heartbeat_interval=plan.heartbeat_interval,
        heartbeat_max_misses=plan.heartbeat_max_misses,
    )


def _buffers(plan: DemoPlan, tp: int, tp_rank: int, num_slots: int) -> Any:
    from kvbridge.buffers import RankBuffers

    head_bytes = plan.heads // tp * HEAD_BYTES
    buffers = RankBuffers.allocate(
        num_regions=plan.layers,
        num_pages=plan.pool_pages(),
        page_bytes=head_bytes,
        num_slots=num_slots,
    )
    buffers.shard = (tp_rank * head_bytes, plan.heads * HEAD_BYTES)
    return buffers


_PATTERNS = 251  # distinct page contents per region (prime: rooms spread over all of them)


class Patterns:
    """Page contents for the demo, generated once per process and reused by every request.

    Page ``position`` of ``room`` in KV region ``r`` is row ``(room + position) % 251`` of a
    random table (the same in every process: seeded), with a stamp of (room, position, region)
    in the first 8 bytes of every head, so a page landing in the wrong place never verifies.
    Filling and verifying a request is a few whole-array numpy operations per region.
    """

    def __init__(self, plan: DemoPlan, tp: int, tp_rank: int) -> None:
        rng = np.random.default_rng(plan.seed + 0x5EED)
        per_rank = plan.heads // tp
        heads = slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
        shape = (_PATTERNS, plan.heads, HEAD_BYTES)
        self.tables = [
            rng.integers(0, 256, shape, dtype=np.uint8)[:, heads].copy() for _ in range(plan.layers)
        ]

    def expected(self, region: int, room: int, count: int) -> np.ndarray:
        positions = np.arange(count, dtype=np.uint64)
        pages = self.tables[region][(room % _PATTERNS + positions) % _PATTERNS]
        stamp = np.uint64(room) ^ (positions * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(region)
        pages.view(np.uint64)[:, :, 0] = stamp[:, None]
        return pages.reshape(count, -1)

    def fill(self, kv: list[np.ndarray], room: int, pages: np.ndarray) -> None:
        for r, region in enumerate(kv):
            region[pages] = self.expected(r, room, len(pages))

    def mismatches(self, kv: list[np.ndarray], room: int, pages: np.ndarray) -> list[str]:
        bad = []
        for r, region in enumerate(kv):
            want = self.expected(r, room, len(pages))
            got = region[pages]
            if not np.array_equal(got, want):
                for i in np.flatnonzero((got != want).any(axis=1)).tolist():
                    bad.append(f"region {r} page {int(pages[i])} (position {i})")
        return bad


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def prefill_main(
    g: int, plan: DemoPlan, ports: dict[str, int], parent: int, stop: Any, results: Any
) -> None:
    """Prefill global rank ``g`` = dp * (cp * tp) + cp * tp_size + tp."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    out: dict[str, Any] = {"role": "prefill", "rank": g, "errors": [], "done_at": {}}
    node = server = None
    try:
        import torch.distributed as dist

        from kvbridge import PagePool, RankIdentity, Role
        from kvbridge.bootstrap.server import BootstrapServer
        from kvbridge.protocol.prefill import PrefillRequest
        from kvbridge.runtime.collective import TorchMinReducer
        from kvbridge.runtime.prefill_node import PrefillNode

        per_replica = plan.prefill_cp * plan.prefill_tp
        dp, local = divmod(g, per_replica)
        cp, tp = divmod(local, plan.prefill_tp)
        init_gloo(g, plan.prefill_dp * per_replica, ports["prefill_gloo"])
        groups = [
            dist.new_group(list(range(r * per_replica, (r + 1) * per_replica)))
            for r in range(plan.prefill_dp)
        ]
        bootstrap = f"127.0.0.1:{ports['bootstrap']}"
        if g == 0:
            server = BootstrapServer("127.0.0.1", ports["bootstrap"]).start()
        rank = RankIdentity(
            Role.PREFILL,
            tp_rank=tp,
            tp_size=plan.prefill_tp,
            cp_rank=cp,
            cp_size=plan.prefill_cp,
            dp_rank=dp,
            dp_size=plan.prefill_dp,
        )
        buffers = _buffers(plan, plan.prefill_tp, tp, num_slots=max(plan.requests, 1))
        patterns = Patterns(plan, plan.prefill_tp, tp)
        config = _config(plan)
        node = PrefillNode(
            config=config,
            rank=rank,
            kv_regions=buffers.kv_regions,
            aux_regions=buffers.aux_regions,
            reducer=TorchMinReducer(groups[dp]),
            bootstrap_addr=bootstrap,
            page_size=plan.page_size,
            kv_dtype="uint8",
            kv_layout="head_sharded",
        )
        mine = [r for r in plan.requests_list() if r[2] == dp]
        tokens = {room: t for room, t, _ in mine}
        pool, slots = PagePool(buffers.kv[0].shape[0]), PagePool(len(buffers.aux))
        forward: dict[int, list[Any]] = {}  # room -> [pages, sent, slot]
        waiting_forward: list[int] = []  # ready rooms this rank has no pages for yet
        step = 0
        stop_seen = 0.0
        while not _orphaned(parent):
            if stop.value:
                # Leave in lock-step: only once the queue is empty on every rank (emptiness
                # is agreed, so no rank is left inside a collective), or after a grace period.
                stop_seen = stop_seen or time.monotonic()
                if not len(node.session) or time.monotonic() - stop_seen > 5.0:
                    break
            arriving = mine[step * plan.arrivals_per_step : (step + 1) * plan.arrivals_per_step]
            if arriving:
                if cp == 0 and tp == 0:
                    node.publish_dp_ranks({room: dp for room, _, _ in arriving})
                node.add([PrefillRequest(room) for room, _, _ in arriving])
            result = node.step()
            # "Forward pass": compute the KV of rooms decode is ready for, oldest first, as far
            # as this rank's pool allows (every rank has the same pool, so all defer alike).
            waiting_forward.extend(result.ready)
            while waiting_forward:
                room = waiting_forward[0]
                pages = pool.alloc(plan.pages_of(tokens[room]))
                if pages is None:
                    break  # the pool frees as earlier rooms finish
                waiting_forward.pop(0)
                slot_ids = slots.alloc(1)
                assert slot_ids is not None  # one slot per request, sized for all of them
                slot = int(slot_ids[0])
                patterns.fill(buffers.kv, room, pages)
                buffers.write_aux(slot, room)
                forward[room] = [pages, 0, slot]
            for room, entry in list(forward.items()):
                pages, sent, slot = entry
                if sent < 0:
                    continue
                chunk = pages[sent : sent + plan.chunk_pages]
                last = sent + len(chunk) >= len(pages)
                node.send(
                    room,
                    chunk if node.manager is not None else chunk[:0],
                    is_last=last,
                    aux_slot=slot,
                )
                entry[1] = -1 if last else sent + len(chunk)
                if last:
                    out["done_at"][room] = time.time()
            for a in result.aborted:
                if a.room in waiting_forward:
                    waiting_forward.remove(a.room)
            for room in list(result.finished) + [a.room for a in result.aborted]:
                if room in forward:
                    entry = forward.pop(room)
                    pool.free(entry[0])
                    slots.free([entry[2]])
            for a in result.aborted:
                out["errors"].append(f"prefill aborted room {a.room}: {a.reason}")
            step += 1
            time.sleep(0.001 if len(node.session) or forward else 0.01)
    except Exception:
        out["errors"].append(traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):
            results.put(out)
        if node is not None:
            node.close()
        if server is not None:
            server.stop()


def decode_main(
    d: int,
    plan: DemoPlan,
    ports: dict[str, int],
    parent: int,
    stop: Any,
    results: Any,
    progress: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out: dict[str, Any] = {
        "role": "decode",
        "rank": d,
        "errors": [],
        "committed": {},
        "aborted": {},
        "bytes": 0,
        "verify_seconds": 0.0,
    }
    node = None
    try:
        from kvbridge import PagePool, RankIdentity, Role
        from kvbridge.protocol.decode import DecodeRequest
        from kvbridge.runtime.collective import TorchMinReducer
        from kvbridge.runtime.decode_node import DecodeNode

        init_gloo(d, plan.decode_tp, ports["decode_gloo"])
        buffers = _buffers(plan, plan.decode_tp, d, num_slots=max(plan.requests // 2, 8))
        patterns = Patterns(plan, plan.decode_tp, d)
        pool = PagePool(buffers.kv[0].shape[0])
        node = DecodeNode(
            config=_config(plan),
            rank=RankIdentity(Role.DECODE, tp_rank=d, tp_size=plan.decode_tp),
            kv_regions=buffers.kv_regions,
            aux=buffers.aux,
            pages=pool,
            reducer=TorchMinReducer(),
            page_size=plan.page_size,
            kv_dtype="uint8",
            kv_layout="head_sharded",
        )
        bootstrap = f"127.0.0.1:{ports['bootstrap']}"
        todo = plan.requests_list()
        step = ended = 0
        last_report = 0.0
        started = time.time()
        drain_until = None  # after the last request ended: wait for fenced memory to lift
        while not stop.value and not _orphaned(parent):
            if ended >= len(todo):
                if not len(node.session):
                    break
                drain_until = (
                    drain_until
                    or time.time()
                    + 2 * plan.heartbeat_interval * max(plan.heartbeat_max_misses, 1)
                    + 5.0
                )
                if time.time() > drain_until:
                    break
            arriving = todo[step * plan.arrivals_per_step : (step + 1) * plan.arrivals_per_step]
            if arriving:
                node.add(
                    [DecodeRequest(room, plan.pages_of(t), bootstrap) for room, t, _ in arriving]
                )
            result = node.step()
            now = time.time()
            verify_started = time.perf_counter()
            for c in result.committed:
                bad = patterns.mismatches(buffers.kv, c.room, c.pages)
                if bad:
                    out["errors"].append(f"room {c.room}: {len(bad)} pages differ, e.g. {bad[0]}")
                if int(c.aux_row["output_token_id"]) != c.room % 50_000:
                    out["errors"].append(f"room {c.room}: aux row differs")
                out["committed"][c.room] = now
                out["bytes"] += len(c.pages) * buffers.page_bytes * plan.layers
                out["bytes"] += buffers.layout.row_bytes
                pool.free(c.pages)  # decoding done
            out["verify_seconds"] += time.perf_counter() - verify_started
            for a in result.aborted:
                out["aborted"][a.room] = a.reason
            ended += len(result.committed) + len(result.aborted)
            if d == 0 and (now - last_report > 0.25 or ended == len(todo)):
                last_report = now
                progress.put(
                    (
                        len(out["committed"]),
                        len(out["aborted"]),
                        len(todo),
                        out["bytes"],
                        now - started,
                    )
                )
            step += 1
            time.sleep(0.001)
        out["pages_free"] = pool.num_free == pool.capacity
        out["slots_free"] = node.session.aux_slots.num_free == node.session.aux_slots.capacity
        out["abort_acks"] = node.abort_acks
        out["fenced_pages"] = node.session.fenced_pages
        out["elapsed"] = time.time() - started
    except Exception:
        out["errors"].append(traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):
            results.put(out)
        if node is not None:
            node.close()


@attrs.frozen
class DemoReport:
    requests: int
    committed: int
    failed: int
    verify_errors: tuple[str, ...]
    bytes_moved: int
    elapsed: float
    latencies_ms: tuple[float, ...]
    failures: dict[int, str] = attrs.field(hash=False)
    pools_full: bool = True
    #: Every distinct failure reason seen on any decode rank.
    reasons: frozenset[str] = frozenset()
    #: The demo's own work on decode (verifying bytes), included in ``elapsed``.
    verify_seconds: float = 0.0
    #: Seconds from the first commit to the last (start-up and bootstrap excluded).
    commit_span: float = 0.0

    def steady_rate(self) -> float:
        """Bytes/s between the first and the last commit (the first request's bytes left out)."""
        if self.committed < 2 or self.commit_span <= 0:
            return 0.0
        return self.bytes_moved * (self.committed - 1) / self.committed / self.commit_span

    @property
    def ok(self) -> bool:
        return self.committed == self.requests and not self.verify_errors and self.pools_full

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def table(self, plan: DemoPlan) -> str:
        rate = self.bytes_moved / self.elapsed / 1e6 if self.elapsed else 0.0
        rows = [
            ("transport", plan.transport),
            (
                "layout",
                f"prefill TP{plan.prefill_tp} CP{plan.prefill_cp} DP{plan.prefill_dp}"
                f" -> decode TP{plan.decode_tp}",
            ),
            ("requests committed", f"{self.committed} / {self.requests}"),
            ("requests failed", str(self.failed)),
            (
                "bytes verified",
                "all" if not self.verify_errors else f"{len(self.verify_errors)} ERRORS",
            ),
            ("bytes moved", f"{self.bytes_moved / 1e6:.1f} MB ({self.bytes_moved} bytes)"),
            ("throughput", f"{rate:.1f} MB/s over {self.elapsed:.2f} s"),
            ("requests/s", f"{self.committed / self.elapsed if self.elapsed else 0.0:.1f}"),
            ("steady throughput", f"{self.steady_rate() / 1e6:.1f} MB/s (first to last commit)"),
            ("demo's own verify time", f"{self.verify_seconds:.2f} s (in the elapsed time)"),
            ("handoff latency p50", f"{self.percentile(50):.1f} ms"),
            ("handoff latency p99", f"{self.percentile(99):.1f} ms"),
            ("pages and aux slots", "all returned" if self.pools_full else "LEAKED"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(plan: DemoPlan, on_progress: Callable[[tuple], None] | None = None) -> DemoReport:
    """Run the demo; every process started here has ended when this returns or raises."""
    ctx = multiprocessing.get_context("spawn")
    ports = {"bootstrap": _free_port(), "prefill_gloo": _free_port(), "decode_gloo": _free_port()}
    # A lock-free flag, not an Event: a process killed while it checks an Event holds the
    # Event's lock forever, and every other process (and this one, setting it) waits on it.
    stop = ctx.RawValue(ctypes.c_bool, False)
    results, progress = ctx.Queue(), ctx.Queue()
    parent = os.getpid()
    prefill_world = plan.prefill_dp * plan.prefill_cp * plan.prefill_tp
    prefill = [
        ctx.Process(
            target=prefill_main,
            args=(g, plan, ports, parent, stop, results),
            name=f"kvbridge-prefill-{g}",
            daemon=True,
        )
        for g in range(prefill_world)
    ]
    decode = [
        ctx.Process(
            target=decode_main,
            args=(d, plan, ports, parent, stop, results, progress),
            name=f"kvbridge-decode-{d}",
            daemon=True,
        )
        for d in range(plan.decode_tp)
    ]
    procs = prefill + decode
    outs: list[dict[str, Any]] = []
    deadline = time.monotonic() + plan.timeout
    try:
        for p in procs:
            p.start()
        killed = False
        decode_outs = 0
        while decode_outs < plan.decode_tp:
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo did not finish within {plan.timeout}s")
            with contextlib.suppress(queue.Empty):
                while True:
                    update = progress.get_nowait()
                    if on_progress is not None:
                        on_progress(update)
                    if (
                        plan.kill_prefill_after is not None
                        and not killed
                        and update[0] >= plan.kill_prefill_after
                    ):
                        for p in prefill:
                            p.kill()
                        killed = True
            with contextlib.suppress(queue.Empty):
                out = results.get(timeout=0.1)
                outs.append(out)
                decode_outs += out["role"] == "decode"
                if (
                    out["role"] == "decode"
                    and out["errors"]
                    and any("Traceback" in e for e in out["errors"])
                ):
                    raise RuntimeError(f"decode rank {out['rank']} crashed:\n{out['errors'][0]}")
            if any(p.exitcode not in (None, 0) for p in decode):
                bad = [p.name for p in decode if p.exitcode not in (None, 0)]
                raise RuntimeError(f"decode process(es) {bad} died")
        stop.value = True
        for _ in range(len([p for p in prefill if p.exitcode is None or p.exitcode == 0])):
            with contextlib.suppress(queue.Empty):
                outs.append(results.get(timeout=10))
    finally:
        stop.value = True
        for p in procs:
            p.join(5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return _report(plan, outs)


def _report(plan: DemoPlan, outs: list[dict[str, Any]]) -> DemoReport:
    decode = sorted((o for o in outs if o["role"] == "decode"), key=lambda o: o["rank"])
    prefill = [o for o in outs if o["role"] == "prefill"]
    errors = [e for o in decode for e in o["errors"]]
    errors += [e for o in prefill for e in o["errors"] if "Traceback" in e]
    committed = decode[0]["committed"] if decode else {}
    failures = decode[0]["aborted"] if decode else {}
    for o in decode[1:]:
        if set(o["committed"]) != set(committed) or set(o["aborted"]) != set(failures):
            errors.append(f"decode rank {o['rank']} disagrees with rank 0 about outcomes")
    # Show each failure's root cause, from whichever decode rank saw it (rule 7).
    failures = {
        room: next(
            (o["aborted"][room] for o in decode if o["aborted"].get(room) != FROM_OTHER_RANK),
            reason,
        )
        for room, reason in failures.items()
    }
    done_at: dict[int, float] = {}
    for o in prefill:
        for room, t in o["done_at"].items():
            done_at[room] = max(done_at.get(room, 0.0), t)
    latencies = tuple(
        (max(o["committed"][room] for o in decode) - done_at[room]) * 1e3
        for room in committed
        if room in done_at
    )
    return DemoReport(
        requests=plan.requests,
        committed=len(committed),
        failed=len(failures),
        verify_errors=tuple(errors),
        bytes_moved=sum(o["bytes"] for o in decode),
        elapsed=max((o.get("elapsed", 0.0) for o in decode), default=0.0),
        latencies_ms=latencies,
        failures=dict(failures),
        pools_full=all(o.get("pages_free") and o.get("slots_free") for o in decode),
        reasons=frozenset(r for o in decode for r in o["aborted"].values()),
        verify_seconds=max((o.get("verify_seconds", 0.0) for o in decode), default=0.0),
        commit_span=max(committed.values()) - min(committed.values()) if committed else 0.0,
    )


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def metrics_server(port: int) -> Any:
    """Serve the metrics of every demo process started inside the block on ``port``.

    The processes write to a fresh ``PROMETHEUS_MULTIPROC_DIR`` (inherited at spawn); this
    process aggregates the directory on each scrape.
    """
    from kvbridge.metrics import serve

    old = os.environ.get(MULTIPROC_ENV)
    with tempfile.TemporaryDirectory(prefix="kvbridge-metrics-") as path:
        os.environ[MULTIPROC_ENV] = path
        server = serve(port, multiprocess_dir=path)
        try:
            yield server
        finally:
            server.shutdown()
            server.server_close()
            if old is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = old


def main(plan: DemoPlan, stream: Any = sys.stderr, metrics_linger: float = 0.0) -> int:
    def show(update: tuple) -> None:
        committed, failed, total, moved, elapsed = update
        stream.write(
            f"\r  {committed + failed}/{total} requests ({committed} committed, "
            f"{failed} failed), {moved * plan.decode_tp / 1e6:.1f} MB in {elapsed:.1f} s   "
        )
        stream.flush()

    print(
        f"kvbridge demo: {plan.requests} requests, prefill TP{plan.prefill_tp} "
        f"CP{plan.prefill_cp} DP{plan.prefill_dp} -> decode TP{plan.decode_tp}, "
        f"transport {plan.transport}",
        file=stream,
    )
    serving = (
        metrics_server(plan.metrics_port)
        if plan.metrics_port is not None
        else contextlib.nullcontext()
    )
    try:
        with serving:
            report = run_demo(plan, show)
            stream.write("\n")
            print(report.table(plan), flush=True)
            for error in report.verify_errors[:10]:
                print(f"  error: {error.strip().splitlines()[-1]}", file=stream)
            for room, reason in list(report.failures.items())[:10]:
                print(f"  failed room {room}: {reason}", file=stream)
            if plan.metrics_port is not None and metrics_linger > 0:
                print(
                    f"  metrics on http://127.0.0.1:{plan.metrics_port}/metrics for "
                    f"{metrics_linger:g} s more",
                    flush=True,
                )
                time.sleep(metrics_linger)
    except KeyboardInterrupt:
        stream.write("\ninterrupted; all demo processes stopped\n")
        return 130
    return 0 if report.ok else 1
