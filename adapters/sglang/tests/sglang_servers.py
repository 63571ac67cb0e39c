"""Real SGLang servers (single, prefill, decode) and sglang-router as separate processes.

Process handling (own process group, stop/kill, readiness) is :mod:`kvbridge.testing.processes`.
SGLang runs on CPU here with the flags ENGINES.md section 4 lists: torch-native attention, no
CUDA graphs, a small token pool, no overlap schedule on prefill, a CPU retraction backup on
decode.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kvbridge.testing import processes
from kvbridge.testing.processes import Server, free_port
from kvbridge.testing.scrape import scrape

ROOT = Path(__file__).resolve().parents[3]

#: kvbridge settings for the tests: a dead prefill is noticed in ~15 s; frequent heartbeats,
#: many misses allowed (this 2-vCPU VM stalls single threads of a busy process for seconds).
TEST_KVBRIDGE_ENV = {
    "KVBRIDGE_BOOTSTRAP_TIMEOUT": "20",
    "KVBRIDGE_WAITING_TIMEOUT": "60",
    "KVBRIDGE_HEARTBEAT_INTERVAL": "1",
    "KVBRIDGE_HEARTBEAT_MAX_MISSES": "15",
}


def base_env(**extra: str) -> dict[str, str]:
    return processes.engine_env(SGLANG_CPU_OMP_THREADS_BIND="0|1", **{**TEST_KVBRIDGE_ENV, **extra})


def start_sglang(
    name: str,
    model: Path,
    log_dir: Path,
    *,
    mode: str | None = None,
    backend: str = "kvbridge",
    bootstrap_port: int | None = None,
    tp: int = 1,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> Server:
    """``mode`` None: a plain server (the reference); "prefill" / "decode": one side of a pair.
    ``port``: the HTTP port (a restart at the address the router knows), else a free one."""
    port = port or free_port()
    args = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
        "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
        "--host", "127.0.0.1", "--port", str(port), "--max-total-tokens", "8192",
        "--dtype", "float32", "--random-seed", "0", "--log-level", "warning",
    ]  # fmt: skip
    if tp > 1:
        args += ["--tp", str(tp)]
    if mode is not None:
        args += [
            "--disaggregation-mode", mode, "--disaggregation-transfer-backend", backend,
            "--enable-metrics",
        ]  # fmt: skip
        if mode == "prefill":
            args += [
                "--disaggregation-bootstrap-port", str(bootstrap_port or free_port()),
                "--disable-overlap-schedule",
            ]  # fmt: skip
        else:
            args += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
    server = processes.start(name, args, port, log_dir, env or base_env(), ROOT)
    server.bootstrap_port = bootstrap_port  # type: ignore[attr-defined]
    return server


def start_router(prefill: Server, bootstrap_port: int, decode: Server, log_dir: Path) -> Server:
    port = free_port()
    args = [
        sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
        "--prefill", prefill.url, str(bootstrap_port), "--decode", decode.url,
        "--host", "127.0.0.1", "--port", str(port),
        # A restarted worker is healthy again within seconds, not the default minute; SGLang's
        # /health runs a forward pass, which takes seconds on a loaded 2-vCPU machine.
        "--health-check-interval-secs", "2", "--health-check-timeout-secs", "30",
        # Its own metrics port: the default (29000) is taken by any other router still up.
        "--prometheus-port", str(free_port()),
    ]  # fmt: skip
    return processes.start("router", args, port, log_dir, base_env(), ROOT)


def wait_router(router: Server, timeout: float = 180.0) -> float:
    """Until the router serves a request: its ``/health`` answers before its workers are
    registered (it answers 503 until then). Returns the seconds the request that was served
    took: the first request through the pair, so its first contact between the servers."""
    deadline = time.monotonic() + timeout
    while True:
        if not router.alive():
            raise RuntimeError(f"router exited with {router.proc.returncode}:\n{router.tail()}")
        start = time.perf_counter()
        try:
            generate(router.url, "w1 w2", 1)
            return time.perf_counter() - start
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"router not serving after {timeout}s: {exc}") from exc
            time.sleep(1.0)


def generate(base: str, text: str, max_new_tokens: int, **fields: Any) -> dict[str, Any]:
    return processes.post(
        base + "/generate",
        {
            "text": text,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0},
            **fields,
        },
        timeout=180,
    )


def output_ids(answer: dict[str, Any]) -> list[int]:
    return list(answer.get("output_ids") or answer["meta_info"].get("output_ids") or [])


def metrics(server: Server) -> dict[str, float]:
    """Prometheus ``name`` -> value summed over labels, from the server's ``/metrics``."""
    return scrape(server.url + "/metrics", labels=False)


def server_info(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(server.url + "/get_server_info", timeout=10) as r:
        answer: dict[str, Any] = json.loads(r.read())
        return answer
