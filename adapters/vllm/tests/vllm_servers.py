"""Start real vLLM OpenAI servers and vllm-router as separate processes (tests, benchmarks).

Process handling (own process group, stop/kill, readiness) is :mod:`kvbridge.testing.processes`.
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
from kvbridge.testing.processes import Server, free_port, kill, post, stop, wait_ready
from kvbridge.testing.scrape import scrape

ROOT = Path(__file__).resolve().parents[3]
__all__ = ["Server", "free_port", "kill", "post", "stop", "wait_ready"]


def base_env() -> dict[str, str]:
    return processes.engine_env(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        VLLM_LOGGING_LEVEL="WARNING",
        VLLM_NO_USAGE_STATS="1",
    )


def kv_config(
    role: str,
    transport: str,
    bootstrap_port: int,
    failure_policy: str = "recompute",
    **kvbridge: Any,
) -> str:
    """``--kv-transfer-config`` for a test instance; ``kvbridge``: settings on top of these."""
    settings = {
        "transport": transport,
        "bootstrap_timeout": 15,
        "waiting_timeout": 30,
        # A dead prefill is noticed after 15 s. Frequent heartbeats, many misses allowed:
        # this 2-vCPU VM (steal time, two vLLM instances busy-polling) stalls single threads
        # of a worker for 2-6 s ("driver thread was late" in the log); kvbridge's default
        # 5 s x 2 tolerates a stall of the prefill's driver thread of about 5 s, this 14 s.
        "heartbeat_interval": 1,
        "heartbeat_max_misses": 15,
        **kvbridge,
    }
    return json.dumps(
        {
            "kv_connector": "KvbridgeConnector",
            "kv_connector_module_path": "kvbridge_vllm",
            "kv_role": role,
            "kv_load_failure_policy": failure_policy,
            "kv_connector_extra_config": {"kvbridge": settings, "bootstrap_port": bootstrap_port},
        }
    )


def start_vllm(
    name: str,
    model: Path,
    log_dir: Path,
    kv: str | None = None,
    port: int | None = None,
    tp: int = 1,
) -> Server:
    port = port or free_port()
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
        "--max-num-seqs", "16", "--seed", "0",
    ]  # fmt: skip
    if tp > 1:
        args += ["--tensor-parallel-size", str(tp)]
    if kv is not None:
        args += ["--kv-transfer-config", kv]
    return processes.start(name, args, port, log_dir, base_env(), ROOT)


def start_router(
    prefill: Server,
    decode: Server,
    bootstrap_port: int,
    connector: str,
    log_dir: Path,
    tag: str = "",
) -> Server:
    """vllm-router (the real one, from the package index) in front of a pair.

    ``connector`` ``mooncake``: the router asks prefill's bootstrap port ``GET /query`` once at
    start, mints a ``transfer_id`` and builds decode's params itself. ``nixl``: no id, decode
    gets the params prefill returned, verbatim."""
    port = free_port()
    binary = str(Path(sys.executable).with_name("vllm-router"))
    prefill_arg = [prefill.url] + ([str(bootstrap_port)] if connector == "mooncake" else [])
    args = [
        binary, "--vllm-pd-disaggregation", "--kv-connector", connector,
        "--prefill", *prefill_arg, "--decode", decode.url,
        "--host", "127.0.0.1", "--port", str(port),
        # Its own Prometheus listener defaults to one fixed port: two routers would collide.
        "--prometheus-port", str(free_port()),
        "--request-timeout-secs", "300", "--disable-retries",
        # A prefill killed and restarted by a test is served again as soon as it answers
        # /health, not after the breaker's or the 60 s health check's own time.
        "--disable-circuit-breaker", "--health-check-interval-secs", "2",
    ]  # fmt: skip
    return processes.start(f"router-{connector}{tag}", args, port, log_dir, base_env(), ROOT)


def complete(base: str, model: Path, prompt: str, max_tokens: int) -> dict[str, Any]:
    return post(
        base + "/v1/completions",
        {"model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0},
    )


def wait_routed(router: Server, model: Path, timeout: float = 90.0) -> None:
    """Until ``router`` routes again (after an instance restarted it answers 503 until its
    health checks passed ``--health-success-threshold`` times)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            complete(router.url, model, "w1 w2 w3", 1)
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def metrics(server: Server) -> dict[str, float]:
    """``name{labels}`` -> value from vLLM's Prometheus endpoint (engine/model labels dropped)."""
    return scrape(server.url + "/metrics", ignore_labels=("engine", "model_name"))


def idle(server: Server) -> dict[str, float]:
    """The figures that must return to zero once nothing is in flight."""
    m = metrics(server)
    return {
        "running": m.get("vllm:num_requests_running", 0.0),
        "waiting": m.get("vllm:num_requests_waiting", 0.0),
        "kv_usage": m.get("vllm:kv_cache_usage_perc", 0.0),
    }


def wait_idle(servers: list[Server], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {s.name: idle(s) for s in servers}
        if all(not any(v for v in st.values()) for st in states.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {timeout}s (leak?): {states}")
        time.sleep(0.5)
