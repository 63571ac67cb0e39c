"""Start real vLLM OpenAI servers and the kvbridge proxy as separate processes (tests, bench).

Every process gets its own session (process group): ``stop`` ends the whole group, SIGTERM
first, SIGKILL after a grace period, so no engine-core or worker child outlives a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    """A port free now and below Linux's ephemeral range (32768-60999 by default): a vLLM
    instance binds it a minute or two later, and a port from ``bind(0)`` may by then have been
    handed to another process's connection or engine (seen: the prefill's bootstrap port)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        OMP_NUM_THREADS="1",
        VLLM_LOGGING_LEVEL="WARNING",
        VLLM_NO_USAGE_STATS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MC_LOG_LEVEL=env.get("MC_LOG_LEVEL", "ERROR"),
        NIXL_LOG_LEVEL=env.get("NIXL_LOG_LEVEL", "WARN"),
        UCX_MODULES=env.get("UCX_MODULES", "^ib"),
        PYTHONUNBUFFERED="1",
    )
    return env


def kv_config(role: str, transport: str, bootstrap_port: int, **kvbridge: Any) -> str:
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
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"kvbridge": settings, "bootstrap_port": bootstrap_port},
        }
    )


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start(name: str, args: list[str], port: int, log_dir: Path, env: dict[str, str]) -> Server:
    log = log_dir / f"{name}.log"
    out = open(log, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT
    )
    out.close()
    return Server(name, port, proc, log, args)


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
    return start(name, args, port, log_dir, base_env())


def start_proxy(prefill: Server, decode: Server, log_dir: Path) -> Server:
    port = free_port()
    args = [
        sys.executable, "-m", "kvbridge_vllm.proxy", "--prefill", prefill.url,
        "--decode", decode.url, "--port", str(port),
    ]  # fmt: skip
    return start("proxy", args, port, log_dir, base_env())


def wait_ready(servers: list[Server], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            if not s.alive():
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode}:\n{s.tail()}")
            try:
                with urllib.request.urlopen(s.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        pending.remove(s)
            except (urllib.error.URLError, OSError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout}s: {[s.name for s in pending]}")
        time.sleep(0.5)


def stop(server: Server | None, grace: float = 20.0) -> None:
    if server is None or server.proc.poll() is not None:
        return
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.proc.wait(grace)
    except subprocess.TimeoutExpired:
        kill(server)
    # Children (engine core, workers) share the group: make sure none is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)


def kill(server: Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)


def post(url: str, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def complete(base: str, model: Path, prompt: str, max_tokens: int) -> dict[str, Any]:
    return post(
        base + "/v1/completions",
        {"model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0},
    )


_METRIC = re.compile(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$")


def metrics(server: Server) -> dict[str, float]:
    """``name{labels}`` -> value from vLLM's Prometheus endpoint (engine/model labels dropped)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = ",".join(
            p
            for p in (m.group(2) or "").strip("{}").split(",")
            if p and not p.startswith(("engine=", "model_name="))
        )
        key = m.group(1) + (f"{{{labels}}}" if labels else "")
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


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
