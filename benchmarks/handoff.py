"""One request's handoff measured end to end: kvbridge vs the raw library plus one all-reduce.

Prefill and decode ranks run in separate processes (spawned), each side with its own gloo
group of ``--world`` ranks (prefill TP W -> decode TP W, whole pages 1:1), a bootstrap server
in prefill rank 0, the control channel and the chosen transport, exactly as an engine wires
``PrefillNode`` / ``DecodeNode``. No demo code: every process fills its source pages once
(random bytes) and every request reuses them. Pages are 64 KiB; per rank per request the
sizes are 64 KiB, 1 MiB, 16 MiB and 64 MiB.

For each size, in one run and in the same processes:

- (a) latency, one request in flight: decode ``add`` -> commit (max over decode ranks), and
  prefill's last ``send`` (max over prefill ranks) -> commit;
- (b) throughput, K requests added at once: K / (first add -> last commit), and bytes/s;
- (c) scheduler steps between "every byte and the aux row landed on every decode rank" and
  the commit. Each decode rank reads its aux room stamps (written last, after the KV pages of
  the chunk) right before every ``step()``; the step index at which the last rank first saw a
  room's stamp is the landing step, ``commit step - landing step`` is recorded (0: committed
  in the first step that started after the bytes were visible on every rank; -1: the bytes
  landed between that read and the step's own poll);
- (d) kvbridge's own CPU per request and rank, per side: ``sequential`` (one request in
  flight) and ``window`` (K in flight, a new one added as one commits) phases of
  ``--cpu-requests`` requests at ``--cpu-sizes-kib``, in which prefill adds rooms as earlier
  ones finish, as an engine sees them arrive. Every thread's CPU time is read from
  ``/proc/self/task/*/schedstat`` (native threads too) at the phase's start and end; the
  scheduler thread's is its thread time inside kvbridge's calls (``add``, ``step``,
  ``send``), the collective's part apart. kvbridge's own = scheduler + control channel
  (receive thread and ZMQ's I/O thread) + bootstrap threads + the transport's Python threads
  (prefill: the kit's send workers; decode: the Fake's receive threads) minus the raw calls'
  CPU for the same bytes. The transport library's native threads are shown apart, for
  kvbridge's phase and the raw one. ``--profile-dir D`` also writes a cProfile (CPU time) of
  every scheduler thread in those phases to ``D``;
- raw: the same bytes (same registered memory, same KV and aux descriptors) through the raw
  library on the connections kvbridge opened (Fake: its own loopback wire without the
  kvbridge booking; Mooncake ``batch_transfer_sync_write``; NIXL ``initialize_xfer`` +
  ``transfer`` + ``check_xfer_state``), each prefill rank at once after a barrier, max over
  ranks; plus one bare gloo all-reduce (1 byte, MIN) on the decode group.

Usage: python benchmarks/handoff.py [--transports fake mooncake nixl] [--worlds 2 1]
       [--sizes-kib 64 1024 16384 65536] [--repeats 10] [--poll-ms 0.5] [--observers on|off]
       [--modes latency throughput sequential window] [--cpu-sizes-kib 1024]
       [--cpu-requests 200] [--profile-dir D] [--transport-options '{"nixl": {...}}']
Writes benchmarks/results/handoff.md and handoff.json (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from typing import Any, NamedTuple

import numpy as np
import thread_cpu
from results_file import notes_mark, write_results

from kvbridge.runtime.collective import init_gloo

PAGE = 64 << 10
POOL_BYTES = 256 << 20  # decode pool per rank
MAX_INFLIGHT = 32
SLOTS = 64
#: The results file keeps everything from this line on when the tables are rewritten.
NOTES_MARK = notes_mark("handoff.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(name: str, options: dict[str, Any] | None = None) -> Any:
    from kvbridge import TransferConfig

    return TransferConfig(
        transport=name,
        waiting_timeout=120,
        bootstrap_timeout=120,
        transport_options=(options or {}).get(name, {}),
    )


def _observers(on: bool) -> Any:
    from kvbridge.observe import ObserverRelay

    return ObserverRelay(discover=on)


class Phase(NamedTuple):
    mode: str
    pages: int  # per request and rank
    count: int  # requests (0: --repeats)
    #: Requests decode keeps in flight (0: all at once).
    window: int = 0

    @property
    def sustained(self) -> bool:
        """Prefill adds rooms as earlier ones finish (an engine's arrival pattern), instead
        of all at the start."""
        return self.mode in SUSTAINED


#: Modes whose requests arrive while earlier ones are in flight, for CPU per request.
SUSTAINED = ("sequential", "window")


def _window(pages: int) -> int:
    return min(MAX_INFLIGHT, POOL_BYTES // PAGE // pages)


def phases(
    sizes_kib: list[int],
    modes: tuple[str, ...] = ("latency", "throughput"),
    cpu_sizes_kib: tuple[int, ...] = (),
    cpu_requests: int = 200,
) -> list[Phase]:
    """The phases in run order; a warm-up first. ``sequential`` and ``window`` run
    ``cpu_requests`` requests at ``cpu_sizes_kib``, one or K at a time."""
    out = [Phase("warmup", 1, 4)]
    for kib in sizes_kib:
        pages = max(kib * 1024 // PAGE, 1)
        if "latency" in modes:
            out.append(Phase("latency", pages, 0, 1))
        if "throughput" in modes:
            out.append(Phase("throughput", pages, _window(pages)))
    for kib in cpu_sizes_kib:
        pages = max(kib * 1024 // PAGE, 1)
        if "sequential" in modes:
            out.append(Phase("sequential", pages, cpu_requests, 1))
        if "window" in modes:
            out.append(Phase("window", pages, cpu_requests, _window(pages)))
    return out


def _phases(args: dict[str, Any] | argparse.Namespace) -> list[Phase]:
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k)
    return phases(
        get("sizes_kib"), tuple(get("modes")), tuple(get("cpu_sizes_kib")), get("cpu_requests")
    )


def _rooms(phase: int, count: int) -> list[int]:
    return [phase * 100_000 + i + 1 for i in range(count)]


# -- raw paths ---------------------------------------------------------------------------------


def _fake_raw_server(listener: socket.socket, stop: threading.Event) -> None:
    """The Fake's loopback wire with no kvbridge booking: land every run, reply ok."""
    from kvbridge_fake import wire

    listener.settimeout(1.0)
    conn = None
    while conn is None and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            conn, _ = listener.accept()
    if conn is None:
        return
    conn.settimeout(None)
    with conn:
        while not stop.is_set():
            try:
                _room, _flags, dst, lengths = wire.decode_header(conn)
            except (ConnectionError, OSError):
                return
            for addr, n in zip(dst.tolist(), lengths.tolist()):
                wire.recv_exact_into(conn, wire.memory_at(addr, n))
            wire.send_reply(conn, True)


class RawPath:
    def __init__(self, name: str, manager: Any, peer: Any, fake_port: int) -> None:
        self.name = name
        self.manager = manager
        self.peer_id = peer.endpoint.get("session") or peer.endpoint.get("agent")
        self.conn = None
        if name == "fake":
            self.conn = socket.create_connection(("127.0.0.1", fake_port), timeout=60)
            self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def transfer(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        if self.name == "fake":
            from kvbridge_fake import wire

            assert self.conn is not None
            self.conn.sendall(wire.encode_header(0, 0, dst, lengths))
            for addr, n in zip(src.tolist(), lengths.tolist()):
                self.conn.sendall(wire.memory_at(addr, n))
            ok, message = wire.read_reply(self.conn)
            if not ok:
                raise RuntimeError(message)
        elif self.name == "mooncake":
            # Same slicing as the plugin (Mooncake's TCP transport limits a batch).
            step = int(self.manager.options["max_batch"])
            for i in range(0, len(src), step):
                ret = self.manager.engine.batch_transfer_sync_write(
                    self.peer_id,
                    src[i : i + step].tolist(),
                    dst[i : i + step].tolist(),
                    lengths[i : i + step].tolist(),
                )
                if ret != 0:
                    raise RuntimeError(f"raw mooncake write failed: {ret}")
        elif self.name == "nixl":
            agent = self.manager.agent
            try:  # host memory; newer plugin builds take the device (-1 = host)
                descs = self.manager._descs(src, lengths, -1), self.manager._descs(dst, lengths, -1)
            except TypeError:
                descs = self.manager._descs(src, lengths), self.manager._descs(dst, lengths)
            # The plugin serialises agent calls by its lock (NIXL's agent runs without thread
            # sync), and with progress_thread off its own thread calls into the agent too.
            with self.manager._lock:
                handle = agent.initialize_xfer("WRITE", *descs, self.peer_id)
                state = agent.transfer(handle)
                while state == "PROC":
                    state = agent.check_xfer_state(handle)
                agent.release_xfer_handle(handle)
            if state != "DONE":
                raise RuntimeError(f"raw nixl transfer ended in {state}")
        else:
            raise ValueError(f"no raw path for {self.name}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# -- processes ---------------------------------------------------------------------------------


def fail(out: dict[str, Any], barrier: Any) -> None:
    """In a benchmark process's ``except``: record the error, release the others' barrier."""
    out["error"] = traceback.format_exc()
    with contextlib.suppress(Exception):
        barrier.abort()


def hand_in(out: dict[str, Any], results: Any, *opened: Any) -> None:
    """In its ``finally``: report ``out`` whatever happened, then close what it opened
    (nodes and raw paths ``close()``, bootstrap servers ``stop()``; None skipped)."""
    with contextlib.suppress(Exception):
        results.put(out)
    for thing in opened:
        if thing is not None:
            (thing.close if hasattr(thing, "close") else thing.stop)()


def prefill_main(rank: int, args: dict[str, Any], barrier: Any, results: Any) -> None:
    out: dict[str, Any] = {"role": "prefill", "rank": rank, "error": None, "phases": []}
    node = server = raw = None
    try:
        import torch.distributed as dist

        from kvbridge import AuxLayout, MemoryRegion, RankIdentity, Role
        from kvbridge.bootstrap.server import BootstrapServer
        from kvbridge.memory import aux_descriptors, kv_descriptors
        from kvbridge.protocol.prefill import PrefillRequest
        from kvbridge.runtime.collective import TorchMinReducer
        from kvbridge.runtime.prefill_node import PrefillNode
        from kvbridge.types import Descriptors

        world = args["world"]
        init_gloo(rank, world, args["ports"]["prefill_gloo"])
        if rank == 0:
            server = BootstrapServer("127.0.0.1", args["ports"]["bootstrap"]).start()
        max_pages = max(p.pages for p in _phases(args))
        kv = np.random.default_rng(rank).integers(0, 256, (max_pages, PAGE), dtype=np.uint8)
        aux = AuxLayout().allocate(SLOTS + 1)  # the last row stays zero: raw writes copy it
        kv_regions = (MemoryRegion.of(kv, PAGE),)
        aux_regions = (MemoryRegion.of(aux, aux.dtype.itemsize),)
        reducer = thread_cpu.MeteredReducer(TorchMinReducer())
        node = PrefillNode(
            config=_config(args["transport"], args["transport_options"]),
            rank=RankIdentity(Role.PREFILL, tp_rank=rank, tp_size=world),
            kv_regions=kv_regions,
            aux_regions=aux_regions,
            reducer=reducer,
            bootstrap_addr=f"127.0.0.1:{args['ports']['bootstrap']}",
            page_size=16,
            kv_dtype="uint8",
            kv_layout="head_sharded",
            observers=_observers(args["observers"]),
        )
        poll = args["poll_ms"] / 1e3
        src_all = np.arange(max_pages, dtype=np.int64)
        meter = thread_cpu.Meter()  # the scheduler thread's CPU inside kvbridge's calls
        profile = thread_cpu.PhaseProfile(args["profile_dir"])
        for index, phase in enumerate(_phases(args)):
            mode, pages = phase.mode, phase.pages
            count = phase.count or args["repeats"]
            rooms = _rooms(index, count)
            barrier.wait(timeout=300)
            cpu_before = thread_cpu.snapshot()
            meter.take()
            reducer.meter.take()
            if phase.sustained:
                profile.start()
            # Sustained phases add rooms as earlier ones finish (finished comes from the
            # reduced vector, so every prefill rank adds the same rooms in the same step),
            # keeping at most two windows ahead of decode; the others add all at once.
            ahead = 2 * max(phase.window, 1) if phase.sustained else count
            added = done = steps = 0
            pending, last_send = set(rooms), {}
            slot_of = {r: i % SLOTS for i, r in enumerate(rooms)}
            deadline = time.monotonic() + 300
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prefill phase {index} did not finish")
                upto = min(count, done + ahead)
                if upto > added:
                    meter(node.add, [PrefillRequest(r) for r in rooms[added:upto]])
                    added = upto
                result = meter(node.step)
                steps += 1
                for room in result.ready:
                    slot = slot_of[room]
                    aux[slot]["output_token_id"] = room % 50_000
                    aux[slot]["room"] = room
                    meter(node.send, room, src_all[:pages], is_last=True, aux_slot=slot)
                    last_send[room] = time.monotonic()
                for room in result.finished:
                    pending.discard(room)
                    done += 1
                for a in result.aborted:
                    raise RuntimeError(f"prefill room {a.room} aborted: {a.reason}")
                time.sleep(poll)
            cpu = _cpu_record(cpu_before, meter, reducer.meter, steps)
            profile.stop(f"prefill{rank}-{args['transport']}-w{world}-{index}-{mode}")
            barrier.wait(timeout=300)  # decode has committed everything
            # Raw: the same KV pages and an aux row, on the connection kvbridge opened.
            raw_times: list[float] = []
            raw_cpu_ns = 0
            raw_before = thread_cpu.snapshot()
            if mode != "warmup":
                if raw is None:
                    peer = next(iter(node.session.rooms.decode_peers.values()))
                    raw = RawPath(
                        args["transport"], node.manager.raw, peer, args["ports"]["fake_raw"][rank]
                    )
                d = Descriptors.concat(
                    [
                        kv_descriptors(
                            kv_regions, peer.kv_regions, src_all[:pages], src_all[:pages]
                        ),
                        aux_descriptors(aux_regions, peer.aux_regions, SLOTS, 0),
                    ]
                )
                for _ in range(count if mode != "latency" else args["repeats"]):
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.thread_time_ns()
                    raw.transfer(d.src, d.dst, d.lengths)
                    raw_cpu_ns += time.thread_time_ns() - c0
                    raw_times.append(time.perf_counter() - t0)
            raw_groups = thread_cpu.by_group(raw_before, thread_cpu.snapshot())
            barrier.wait(timeout=300)
            out["phases"].append(
                {
                    "last_send": last_send,
                    "raw": raw_times,
                    "cpu": cpu,
                    "raw_cpu": {"caller_ns": raw_cpu_ns, "groups": raw_groups},
                }
            )
    except Exception:
        fail(out, barrier)
    finally:
        hand_in(out, results, raw, node, server)


def decode_main(rank: int, args: dict[str, Any], barrier: Any, results: Any) -> None:
    out: dict[str, Any] = {"role": "decode", "rank": rank, "error": None, "phases": []}
    node = None
    stop = threading.Event()
    try:
        import torch
        import torch.distributed as dist

        from kvbridge import AuxLayout, MemoryRegion, PagePool, RankIdentity, Role
        from kvbridge.protocol.decode import DecodeRequest
        from kvbridge.runtime.collective import TorchMinReducer
        from kvbridge.runtime.decode_node import DecodeNode

        world = args["world"]
        init_gloo(rank, world, args["ports"]["decode_gloo"])
        listener = socket.create_server(("127.0.0.1", args["ports"]["fake_raw"][rank]))
        threading.Thread(
            target=_fake_raw_server,
            args=(listener, stop),
            daemon=True,
            name=f"bench-raw-receive-{rank}",
        ).start()
        # Resident, like an engine's KV pool: np.zeros maps pages lazily, and the first write
        # to each would pay a page fault that the raw path (always the same pages) never pays.
        kv = np.empty((POOL_BYTES // PAGE, PAGE), dtype=np.uint8)
        kv.fill(0)
        aux = AuxLayout().allocate(SLOTS)
        pool = PagePool(kv.shape[0])
        reducer = thread_cpu.MeteredReducer(TorchMinReducer())
        node = DecodeNode(
            config=_config(args["transport"], args["transport_options"]),
            rank=RankIdentity(Role.DECODE, tp_rank=rank, tp_size=world),
            kv_regions=(MemoryRegion.of(kv, PAGE),),
            aux=aux,
            pages=pool,
            reducer=reducer,
            page_size=16,
            kv_dtype="uint8",
            kv_layout="head_sharded",
            observers=_observers(args["observers"]),
        )
        bootstrap = f"127.0.0.1:{args['ports']['bootstrap']}"
        stamps = aux["room"]
        poll = args["poll_ms"] / 1e3
        meter = thread_cpu.Meter()  # the scheduler thread's CPU inside kvbridge's calls
        profile = thread_cpu.PhaseProfile(args["profile_dir"])
        for index, phase in enumerate(_phases(args)):
            mode, pages = phase.mode, phase.pages
            count = phase.count or args["repeats"]
            window = phase.window or count
            rooms = _rooms(index, count)
            added: dict[int, float] = {}
            committed: dict[int, float] = {}
            landed_step: dict[int, int] = {}
            commit_step: dict[int, int] = {}
            step = 0
            barrier.wait(timeout=300)
            cpu_before = thread_cpu.snapshot()
            meter.take()
            reducer.meter.take()
            if phase.sustained:
                profile.start()
            waiting = list(rooms)
            deadline = time.monotonic() + 300
            t_start = time.monotonic()
            while len(committed) < len(rooms):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"decode phase {index} did not finish")
                # Commits come from the reduced vector: every rank adds the same rooms.
                room_for = window - (len(added) - len(committed))
                if waiting and room_for > 0:
                    batch = waiting[:room_for]
                    meter(node.add, [DecodeRequest(r, pages, bootstrap) for r in batch])
                    now = time.monotonic()
                    added.update((r, now) for r in batch)
                    waiting = waiting[len(batch) :]
                for slot in np.flatnonzero(stamps).tolist():  # (c): what landed before the step
                    landed_step.setdefault(int(stamps[slot]), step)
                result = meter(node.step)
                now = time.monotonic()
                step += 1
                for c in result.committed:
                    committed[c.room] = now
                    commit_step[c.room] = step - 1
                    pool.free(c.pages)
                for a in result.aborted:
                    raise RuntimeError(f"decode room {a.room} aborted: {a.reason}")
                time.sleep(poll)
            t_end = time.monotonic()
            cpu = _cpu_record(cpu_before, meter, reducer.meter, step)
            profile.stop(f"decode{rank}-{args['transport']}-w{world}-{index}-{mode}")
            barrier.wait(timeout=300)  # prefill runs the raw transfers now
            raw_before = thread_cpu.snapshot()
            barrier.wait(timeout=300)
            raw_groups = thread_cpu.by_group(raw_before, thread_cpu.snapshot())
            allreduce: list[float] = []
            if mode != "warmup":
                one = torch.zeros(1, dtype=torch.uint8)
                for _ in range(args["repeats"]):
                    dist.barrier()
                    t0 = time.perf_counter()
                    dist.all_reduce(one, op=dist.ReduceOp.MIN)
                    allreduce.append(time.perf_counter() - t0)
            out["phases"].append(
                {
                    "added": added,
                    "committed": committed,
                    "landed_step": landed_step,
                    "commit_step": commit_step,
                    "span": t_end - t_start,
                    "allreduce": allreduce,
                    "cpu": cpu,
                    "raw_cpu": {"caller_ns": 0, "groups": raw_groups},
                }
            )
        out["observer_us"] = _observer_cost(node)
        out["wake_floor_us"] = _wake_floor(poll)
    except Exception:
        fail(out, barrier)
    finally:
        stop.set()
        hand_in(out, results, node)


def _cpu_record(
    before: Any, meter: thread_cpu.Meter, reduce: thread_cpu.Meter, steps: int
) -> dict[str, Any]:
    """What a phase cost this process: CPU ns per thread group, and the scheduler thread's
    inside kvbridge's calls (``sched_ns``, of which ``reduce_ns`` in the collective)."""
    after = thread_cpu.snapshot()
    sched_ns, calls = meter.take()
    reduce_ns, reduces = reduce.take()
    library = {
        name: ns
        for name, ns in thread_cpu.by_name(before, after).items()
        if thread_cpu.group_of(name) == "library" and ns > 0
    }
    return {
        "groups": thread_cpu.by_group(before, after),
        "library": library,
        "sched_ns": sched_ns,
        "calls": calls,
        "reduce_ns": reduce_ns,
        "reduces": reduces,
        "steps": steps,
    }


def _wake_floor(poll: float, n: int = 2000) -> tuple[float, float]:
    """This machine's floor for a step, in thread CPU microseconds: a thread that sleeps for
    the poll interval and wakes (nothing else), and one that then makes 20 small numpy calls
    (about what a step makes per layer it passes). Measured in the decode rank's process."""
    small = np.zeros(4, dtype=np.uint8)

    def cycle(calls: int) -> float:
        t0 = time.thread_time_ns()
        for _ in range(n):
            time.sleep(poll)
            for _ in range(calls):
                np.flatnonzero(small == 1)
        return (time.thread_time_ns() - t0) / n / 1e3

    return cycle(0), cycle(20)


def _observer_cost(node: Any, n: int = 2000) -> float:
    """Microseconds per ``kvbridge_step`` observer call as the session makes it (0: none)."""
    from kvbridge.types import Role

    relay = node.session.observers
    if not relay.active:
        return 0.0
    stages = np.zeros(64, dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(n):
        relay.call(
            "kvbridge_step",
            role=Role.DECODE,
            rank=node.rank,
            queued=64,
            reduced=64,
            stages=stages,
            fenced_bytes=0,
        )
    return (time.perf_counter() - t0) / n * 1e6


# -- driver ------------------------------------------------------------------------------------


def run(transport: str, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    ports = {
        "bootstrap": _free_port(),
        "prefill_gloo": _free_port(),
        "decode_gloo": _free_port(),
        "fake_raw": [_free_port() for _ in range(world)],
    }
    common = {
        "transport": transport,
        "world": world,
        "ports": ports,
        "sizes_kib": args.sizes_kib,
        "repeats": args.repeats,
        "poll_ms": args.poll_ms,
        "observers": args.observers == "on",
        "modes": tuple(args.modes),
        "cpu_sizes_kib": tuple(args.cpu_sizes_kib),
        "cpu_requests": args.cpu_requests,
        "profile_dir": args.profile_dir,
        "transport_options": args.transport_options,
    }
    barrier, results = ctx.Barrier(2 * world), ctx.Queue()
    procs = [
        ctx.Process(target=prefill_main, args=(r, common, barrier, results), daemon=True)
        for r in range(world)
    ] + [
        ctx.Process(target=decode_main, args=(r, common, barrier, results), daemon=True)
        for r in range(world)
    ]
    outs = run_processes(procs, results, args.timeout, f"{transport} world {world}")
    return summarise(transport, world, outs, args)


def run_processes(procs: list[Any], results: Any, timeout: float, what: str) -> list[Any]:
    """Start ``procs``, gather one result each (stopping at the first error), make sure none
    is left running, and raise the first error. Returns the results."""
    outs: list[dict[str, Any]] = []
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(outs) < len(procs) and not any(o["error"] for o in outs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish")
            with contextlib.suppress(Exception):
                outs.append(results.get(timeout=1))
    finally:
        for p in procs:
            p.join(20)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [o["error"] for o in outs if o["error"]]
    if errors:
        raise RuntimeError(f"{what} failed:\n{errors[0]}")
    return outs


def cpu_per_request(
    prefill: list[dict[str, Any]], decode: list[dict[str, Any]], raw_count: int
) -> dict[str, float]:
    """Microseconds of CPU per request and rank (mean over ranks), per side and thread group.

    ``own`` is kvbridge's: the scheduler thread inside kvbridge's calls, the control channel
    (its receive thread and ZMQ's I/O thread) and the bootstrap threads, plus the transport's
    Python threads (prefill: the kit's per-peer send workers; decode: the Fake's receive
    threads) minus what the raw path's calls cost for the same bytes (prefill: the calling
    thread; decode: the benchmark's raw receive thread). The library's own native threads are
    listed apart, for kvbridge's phase and the raw one: they move the bytes either way.
    """
    out: dict[str, float] = {}
    for side, per_rank in (("prefill", prefill), ("decode", decode)):
        count = len(per_rank[0]["committed"] if side == "decode" else per_rank[0]["last_send"])

        def us(get: Any, per: int, ranks: list[dict[str, Any]] = per_rank) -> float:
            return sum(get(p) for p in ranks) / len(ranks) / max(per, 1) / 1e3

        def group(name: str, key: str = "cpu") -> Any:
            return lambda p: p[key]["groups"].get(name, 0)

        sched = us(lambda p: p["cpu"]["sched_ns"], count)
        control = us(group("control"), count) + us(group("zmq_io"), count)
        bootstrap = us(group("bootstrap"), count)
        if side == "prefill":
            threads = us(group("send_workers"), count)
            raw = us(lambda p: p["raw_cpu"]["caller_ns"], raw_count)
        else:
            threads = us(group("fake_receive"), count)
            raw = us(group("raw_receive", "raw_cpu"), raw_count)
        out.update(
            {
                f"{side}_sched_us": sched,
                f"{side}_reduce_us": us(lambda p: p["cpu"]["reduce_ns"], count),
                f"{side}_control_us": control,
                f"{side}_bootstrap_us": bootstrap,
                f"{side}_transport_threads_us": threads,
                f"{side}_raw_us": raw,
                f"{side}_own_us": sched + control + bootstrap + threads - raw,
                f"{side}_library_us": us(group("library"), count),
                f"{side}_raw_library_us": us(group("library", "raw_cpu"), raw_count),
                f"{side}_steps_per_request": us(lambda p: p["cpu"]["steps"], count) * 1e3,
            }
        )
    return out


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(
    transport: str, world: int, outs: list[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    prefill = [o for o in outs if o["role"] == "prefill"]
    decode = [o for o in outs if o["role"] == "decode"]
    rows = []
    for index, phase in enumerate(_phases(args)):
        mode, pages, count = phase.mode, phase.pages, phase.count or args.repeats
        if mode == "warmup":
            continue
        dp = [o["phases"][index] for o in decode]
        pp = [o["phases"][index] for o in prefill]
        rooms = list(dp[0]["committed"])
        commit = {r: max(d["committed"][r] for d in dp) for r in rooms}
        raw = [max(ts) for ts in zip(*(p["raw"] for p in pp))]
        allreduce = statistics.median(x for d in dp for x in d["allreduce"])
        size = pages * PAGE
        row: dict[str, Any] = {
            "transport": transport,
            "world": world,
            "mode": mode,
            "requests": count,
            "kib": size >> 10,
            "observers": args.observers,
            "window": phase.window or count,
        }
        row.update(cpu_per_request(pp, dp, len(raw)))
        if mode == "latency":
            add_commit = [(commit[r] - max(d["added"][r] for d in dp)) * 1e3 for r in rooms]
            send_commit = [(commit[r] - max(p["last_send"][r] for p in pp)) * 1e3 for r in rooms]
            base = (statistics.median(raw) + allreduce) * 1e3
            row.update(
                add_commit_p50_ms=_p(add_commit, 50),
                send_commit_p50_ms=_p(send_commit, 50),
                raw_p50_ms=statistics.median(raw) * 1e3,
                allreduce_p50_ms=allreduce * 1e3,
                baseline_ms=base,
                added_over_baseline_ms=_p(send_commit, 50) - base,
                add_commit_over_baseline_ms=_p(add_commit, 50) - base,
            )
        else:
            span = max(d["span"] for d in dp)
            kv_bps = size * count / span
            raw_bps = size * len(raw) / sum(raw)
            row.update(
                rps=count / span,
                kvbridge_gbps=kv_bps / 1e9,
                raw_gbps=raw_bps / 1e9,
                vs_raw=kv_bps / raw_bps,
            )
        steps = [
            d["commit_step"][r] - max(x["landed_step"].get(r, d["commit_step"][r]) for x in dp)
            for d in dp[:1]
            for r in rooms
        ]
        row.update(steps_p50=_p(steps, 50), steps_p99=_p(steps, 99), steps_max=max(steps))
        rows.append(row)
    cost = [o.get("observer_us", 0.0) for o in decode]
    floor = next((o["wake_floor_us"] for o in decode if o.get("wake_floor_us")), None)
    for row in rows:
        row["observer_step_us"] = max(cost)
        row["wake_floor_us"] = floor
    return rows


def render(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Handoff end to end: kvbridge vs raw library + one all-reduce",
        "",
        f"Measured {datetime.date.today()} with `{command}` (2-vCPU VM shared with other "
        "jobs: timings are noisy; every ratio compares figures from the same run and the "
        "same processes).",
        "",
        "## (a) latency, one request in flight (p50, ms)",
        "",
        "| transport | world | KiB/rank | add->commit | last send->commit | raw | all-reduce "
        "| raw + all-reduce | send->commit minus baseline | steps landed->commit p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["mode"] == "latency":
            lines.append(
                f"| {r['transport']} | {r['world']} | {r['kib']} | {r['add_commit_p50_ms']:.2f} "
                f"| {r['send_commit_p50_ms']:.2f} | {r['raw_p50_ms']:.2f} "
                f"| {r['allreduce_p50_ms']:.3f} | {r['baseline_ms']:.2f} "
                f"| {r['added_over_baseline_ms']:+.2f} | {r['steps_p99']:.0f} |"
            )
    lines += [
        "",
        "## (b) throughput, K requests in flight",
        "",
        "| transport | world | KiB/rank | K | requests/s | kvbridge GB/s/rank | raw GB/s/rank "
        "| kvbridge / raw | steps landed->commit p50 / p99 / max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["mode"] == "throughput":
            lines.append(
                f"| {r['transport']} | {r['world']} | {r['kib']} | {r['requests']} "
                f"| {r['rps']:.1f} | {r['kvbridge_gbps']:.3f} | {r['raw_gbps']:.3f} "
                f"| {r['vs_raw']:.2f} | {r['steps_p50']:.0f} / {r['steps_p99']:.0f} "
                f"/ {r['steps_max']} |"
            )
    lines += [
        "",
        "## (d) kvbridge's own CPU per request and rank (us)",
        "",
        "Thread CPU time over the phase's requests (sequential: one in flight; window: K in "
        "flight, new ones added as others commit), mean over ranks. own = scheduler thread in "
        "kvbridge's calls + control (receive thread, ZMQ I/O) + bootstrap threads + transport "
        "Python threads minus the raw calls' CPU for the same bytes. Library: the transport "
        "library's native threads, in kvbridge's phase / the raw one.",
        "",
        "| transport | world | mode | KiB/rank | N (K) | side | own | scheduler (collective) "
        "| control | bootstrap | transport threads - raw | steps/request | library kvbridge / raw "
        "| requests/s |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["mode"] not in SUSTAINED:
            continue
        for side in ("prefill", "decode"):
            c = {k[len(side) + 1 :]: v for k, v in r.items() if k.startswith(side + "_")}
            lines.append(
                f"| {r['transport']} | {r['world']} | {r['mode']} | {r['kib']} "
                f"| {r['requests']} ({r['window']}) | {side} | **{c['own_us']:.0f}** "
                f"| {c['sched_us']:.0f} ({c['reduce_us']:.0f}) | {c['control_us']:.0f} "
                f"| {c['bootstrap_us']:.0f} "
                f"| {c['transport_threads_us']:.0f} - {c['raw_us']:.0f} "
                f"| {c['steps_per_request']:.1f} "
                f"| {c['library_us']:.0f} / {c['raw_library_us']:.0f} | {r['rps']:.0f} |"
            )
    cost = max(r["observer_step_us"] for r in rows)
    lines += ["", f"Observer (Prometheus exporter) cost per step call: {cost:.1f} us."]
    floors = [r["wake_floor_us"] for r in rows if r.get("wake_floor_us")]
    if floors:
        wake = statistics.median(f[0] for f in floors)
        numpy_wake = statistics.median(f[1] for f in floors)
        lines += [
            "",
            "This machine's floor, same run (decode rank's process, thread CPU per cycle): a "
            f"thread that sleeps the poll interval and wakes, {wake:.1f} us; waking and then "
            f"making 20 small numpy calls, {numpy_wake:.1f} us. A step costs at least the first; "
            "one request in flight pays every step it takes.",
        ]
    loads = {(r["transport"], r["world"]): r.get("load_1m") for r in rows}
    lines += [
        "",
        "Load average (1 min) at the start / end of each transport and world (2 vCPUs): "
        + "; ".join(
            f"{t} w{w} {v[0]:.2f} / {v[1]:.2f}" for (t, w), v in loads.items() if v is not None
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transports", nargs="+", default=["fake", "mooncake", "nixl"])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=[64, 1024, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--poll-ms", type=float, default=0.5, help="sleep between steps")
    parser.add_argument("--observers", choices=["on", "off"], default="on")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["latency", "throughput", *SUSTAINED],
        default=["latency", "throughput", *SUSTAINED],
        help="phases to run (profiling one: repeat a size, e.g. --sizes-kib 1024 1024 1024)",
    )
    parser.add_argument(
        "--cpu-sizes-kib",
        type=int,
        nargs="+",
        default=[1024],
        help="sizes of the sequential and window phases (kvbridge's CPU per request)",
    )
    parser.add_argument("--cpu-requests", type=int, default=200)
    parser.add_argument(
        "--profile-dir",
        default=None,
        help="write a cProfile (CPU time) of each scheduler thread in the sequential and "
        "window phases here",
    )
    parser.add_argument(
        "--transport-options",
        type=json.loads,
        default={},
        help='JSON, per transport: e.g. \'{"nixl": {"progress_thread": true}}\'',
    )
    parser.add_argument("--timeout", type=float, default=540.0, help="per transport and world")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default="handoff", help="results file stem")
    args = parser.parse_args()
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    os.environ.setdefault("UCX_MODULES", "^ib")
    rows = []
    for name in args.transports:
        for world in args.worlds:
            print(f"measuring {name} world {world} ...", file=sys.stderr, flush=True)
            try:
                load = os.getloadavg()[0]
                measured = run(name, world, args)
                for row in measured:  # 1-minute load average, start / end of this run
                    row["load_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                rows += measured
            except Exception as exc:  # recorded; the other transports still run
                print(f"{name} world {world} failed: {exc}", file=sys.stderr, flush=True)
    command = "python benchmarks/handoff.py " + " ".join(sys.argv[1:])
    text = render(rows, command.strip())
    print(text)
    if not args.no_write:
        write_results(args.out, text, rows, NOTES_MARK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
