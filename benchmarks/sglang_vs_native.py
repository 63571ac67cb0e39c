"""kvbridge-sglang against SGLang's own transfer backends, side by side, on this machine.

Each configuration is a fresh prefill + decode pair of real SGLang servers behind sglang-router,
on the same tiny model and prompts; configurations alternate (A/B/A/B...) for ``--rounds``
rounds. Per round and configuration: time to first token through the router (streamed
``/generate``, sequential requests), the total time of ``--concurrent`` requests sent at once,
and the per-request KV transfer time each backend reports to SGLang's own metrics
(``sglang:kv_transfer_latency_ms``, prefill side). Outputs must equal across configurations.

SGLang's Mooncake backend on CPU needs ``SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER=1`` (else
its prefill takes a ``pin_memory`` path and dies on the first request), ``MOONCAKE_PROTOCOL=tcp``
and ``SGLANG_HOST_IP=127.0.0.1``; they are set for that configuration only and change nothing it
measures. kvbridge runs on its own Mooncake transport (same library, TCP).

SGLang's NIXL backend labels its KV pool and aux buffers VRAM even with ``--device cpu``, and
UCX refuses to register host memory as VRAM, so that backend cannot start on CPU. For the
``sglang-nixl`` configuration only, a ``sitecustomize`` on ``PYTHONPATH`` (:data:`NIXL_SHIM`,
its text also in the JSON) makes every NIXL agent in those processes read "VRAM" as "DRAM"
once SGLang imports its NIXL module: the same memory, registered as what it is; the backend's
transfers, threads (8 UCX worker threads on prefill) and progress thread are as shipped.
``kvbridge-nixl`` is kvbridge's NIXL transport as shipped (progress thread off);
``kvbridge-nixl-progress`` turns NIXL's progress thread on, as SGLang's backend has it.
Each kvbridge configuration's ratios are against SGLang's backend on the same transport.

Run with the SGLang venv: ``.venv-sglang/bin/python benchmarks/sglang_vs_native.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "adapters" / "sglang" / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sglang_servers as ss  # noqa: E402
from import_shim import python_path, shim_source, write_shim  # noqa: E402
from results_file import notes_mark, write_results  # noqa: E402

from kvbridge.testing import processes  # noqa: E402
from kvbridge.testing.tiny_model import build, prompt  # noqa: E402

NOTES_MARK = notes_mark("sglang_vs_native.py")

NIXL_SHIM = shim_source(
    """Written by benchmarks/sglang_vs_native.py, on PYTHONPATH of sglang-nixl pairs only.

SGLang 0.5.23's NIXL backend registers and describes its KV and aux buffers as VRAM, also
with --device cpu, and UCX refuses host memory registered as VRAM. Once SGLang imports its
NIXL module, every NIXL agent created afterwards maps "VRAM" (and "cuda") to DRAM: the same
memory, registered as what it is. Nothing else changes.""",
    "sglang.srt.disaggregation.nixl.conn",
    """
def _patch(module):
    from nixl._api import nixl_agent

    init = nixl_agent.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.nixl_mems["VRAM"] = self.nixl_mems["cuda"] = self.nixl_mems["DRAM"]

    nixl_agent.__init__ = __init__
""",
)
#: name -> (SGLang's --disaggregation-transfer-backend, transport, extra environment)
CONFIGS = {
    "kvbridge-mooncake": ("kvbridge", "mooncake", {"KVBRIDGE_TRANSPORT": "mooncake"}),
    "sglang-mooncake": (
        "mooncake",
        "mooncake",
        {
            "SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER": "1",
            "MOONCAKE_PROTOCOL": "tcp",
            "SGLANG_HOST_IP": "127.0.0.1",
        },
    ),
    "kvbridge-nixl": ("kvbridge", "nixl", {"KVBRIDGE_TRANSPORT": "nixl"}),
    "kvbridge-nixl-progress": (
        "kvbridge",
        "nixl",
        {"KVBRIDGE_TRANSPORT": "nixl", "KVBRIDGE_TRANSPORT_OPTIONS": '{"progress_thread": true}'},
    ),
    "sglang-nixl": ("nixl", "nixl", {"SGLANG_HOST_IP": "127.0.0.1"}),
    "kvbridge-fake": ("kvbridge", "fake", {"KVBRIDGE_TRANSPORT": "fake"}),
    # The first request to a new prefill without the adapter's lookup wait (SGLang retries a
    # second later): what kvbridge-sglang did before the wait.
    "kvbridge-mooncake-nowait": (
        "kvbridge",
        "mooncake",
        {"KVBRIDGE_TRANSPORT": "mooncake", "KVBRIDGE_SGLANG_LOOKUP_WAIT": "0"},
    ),
}


def baseline(name: str, names: list[str]) -> str | None:
    """The SGLang backend a kvbridge configuration is compared with: the same transport's, if
    this run has it (else the last configuration named, when that is not kvbridge's)."""
    backend, transport, _ = CONFIGS[name]
    if backend != "kvbridge":
        return None
    same = [n for n in names if CONFIGS[n][0] != "kvbridge" and CONFIGS[n][1] == transport]
    if same:
        return same[0]
    last = names[-1]
    return last if CONFIGS[last][0] != "kvbridge" else None


def ttft(url: str, text: str, max_new: int) -> tuple[float, list[int]]:
    body = {
        "text": text,
        "stream": True,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0},
    }
    req = urllib.request.Request(
        url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    first = None
    ids: list[int] = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - start
            ids = ss.output_ids(json.loads(line[5:]))
    return first or float("nan"), ids


def run_config(
    name: str, model: Path, logs: Path, prompts: list[str], args: argparse.Namespace, shim: Path
):
    backend, _, extra = CONFIGS[name]
    env = ss.base_env(**extra)
    if name == "sglang-nixl":
        env["PYTHONPATH"] = python_path(shim, env)
    boot = processes.free_port()
    pre = ss.start_sglang(
        f"{name}-prefill",
        model,
        logs,
        mode="prefill",
        backend=backend,
        bootstrap_port=boot,
        env=env,
    )
    dec = ss.start_sglang(f"{name}-decode", model, logs, mode="decode", backend=backend, env=env)
    router = None
    try:
        processes.wait_ready([pre, dec], timeout=600)
        router = ss.start_router(pre, boot, dec, logs)
        processes.wait_ready([router], timeout=120)
        # The first request served is the pair's first contact: the bootstrap look-up and the
        # transport's connection (a 2-token prompt, 1 new token, end to end).
        first_request = ss.wait_router(router)
        ttft(router.url, prompts[0], 2)  # the first long prompt: not measured
        before = ss.metrics(pre)
        firsts, outputs = [], []
        for text in prompts:
            t, ids = ttft(router.url, text, args.max_new)
            firsts.append(t)
            outputs.append(ids)
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(args.concurrent) as ex:
            list(
                ex.map(
                    lambda t: ss.generate(router.url, t, args.max_new), prompts[: args.concurrent]
                )
            )
        concurrent_s = time.perf_counter() - start
        after = ss.metrics(pre)
        n = after.get("sglang:kv_transfer_latency_ms_count", 0) - before.get(
            "sglang:kv_transfer_latency_ms_count", 0
        )
        ms = after.get("sglang:kv_transfer_latency_ms_sum", 0) - before.get(
            "sglang:kv_transfer_latency_ms_sum", 0
        )
        return {
            "ttft_p50": statistics.median(firsts),
            "ttft_p90": sorted(firsts)[int(0.9 * (len(firsts) - 1))],
            "concurrent_s": concurrent_s,
            "first_request_s": first_request,
            "transfer_ms_mean": ms / n if n else float("nan"),
            "outputs": outputs,
        }
    finally:
        for s in (router, dec, pre):
            processes.stop(s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--max-new", type=int, default=8)
    parser.add_argument("--configs", default="kvbridge-mooncake,sglang-mooncake")
    parser.add_argument(
        "--out",
        default="sglang_vs_native",
        help="results stem: benchmarks/results/<stem>.md (notes below the mark kept) and .json",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    names = args.configs.split(",")
    work = Path(tempfile.mkdtemp(prefix="kvbridge-sglang-bench-"))
    model = build(work / "model", seed=4321)  # not the tests' model
    logs = work / "logs"
    logs.mkdir()
    shim = write_shim(work / "nixl-shim", NIXL_SHIM)
    prompts = [prompt(args.tokens, 1000 + i) for i in range(args.requests)]
    results: dict[str, list[dict]] = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        for name in names:
            print(f"[bench] round {r + 1}/{args.rounds}: {name}", flush=True)
            results[name].append(run_config(name, model, logs, prompts, args, shim))
            loads.append(os.getloadavg()[0])
    reference = results[names[0]][0]["outputs"]
    same = all(res["outputs"] == reference for runs in results.values() for res in runs)
    lines = [
        "# kvbridge-sglang against SGLang's own backends",
        "",
        f"Command: `.venv-sglang/bin/python benchmarks/sglang_vs_native.py --rounds {args.rounds} "
        f"--requests {args.requests} --concurrent {args.concurrent} --tokens {args.tokens} "
        f"--configs {args.configs}`",
        "",
        f"Tiny Llama (seed 4321), {args.tokens}-token prompts, {args.max_new} new tokens, greedy; "
        f"fresh pair per round and configuration, alternating; load average during the run "
        f"{min(loads):.1f}-{max(loads):.1f} (1 min, 2 vCPUs). Outputs equal across "
        f"configurations: {same}.",
        "",
        "| configuration | round | TTFT p50 (ms) | TTFT p90 (ms) | "
        f"{args.concurrent} concurrent (s) | first request, end to end (ms) | "
        "KV transfer per request (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for i, res in enumerate(results[name]):
            lines.append(
                f"| {name} | {i + 1} | {res['ttft_p50'] * 1000:.0f} | {res['ttft_p90'] * 1000:.0f} "
                f"| {res['concurrent_s']:.2f} | {res['first_request_s'] * 1000:.0f} "
                f"| {res['transfer_ms_mean']:.1f} |"
            )
    lines += ["", "Ratios (median over rounds of the same round's pair; < 1 means faster):", ""]
    for name in names:
        base = baseline(name, names)
        if base is None:
            continue
        for key, label in (
            ("ttft_p50", "TTFT p50"),
            ("concurrent_s", "concurrent total"),
            ("first_request_s", "first request to a new prefill"),
            ("transfer_ms_mean", "KV transfer per request"),
        ):
            pairs = [
                a[key] / b[key]
                for a, b in zip(results[name], results[base])
                if b[key] and a[key] == a[key] and b[key] == b[key]  # NaN: not reported
            ]
            text = f"{statistics.median(pairs):.2f}x" if pairs else "not reported"
            lines.append(f"- {name} {label} against {base}: {text}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        data = {
            "command": sys.argv[1:],
            "loads": loads,
            "outputs_equal": same,
            "rounds": {
                name: [{k: v for k, v in res.items() if k != "outputs"} for res in runs]
                for name, runs in results.items()
            },
            "nixl_sitecustomize": NIXL_SHIM if "sglang-nixl" in names else None,
        }
        write_results(args.out, text, data, NOTES_MARK)
    if not same:
        sys.exit("outputs differ between configurations")


if __name__ == "__main__":
    main()
