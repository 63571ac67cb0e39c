"""Engine servers as separate processes, for the adapters' end-to-end tests and benchmarks.

Every process gets its own session (process group): :func:`stop` ends the whole group, SIGTERM
first, SIGKILL after a grace period, so no scheduler, engine-core or worker child outlives a
test. pytest-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def engine_env(**extra: str) -> dict[str, str]:
    """This process's environment for an engine server: offline model loading, one OpenMP
    thread, unbuffered output, the native transports' logs quiet (unless set), UCX off
    InfiniBand; then ``extra``."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MC_LOG_LEVEL=env.get("MC_LOG_LEVEL", "ERROR"),
        NIXL_LOG_LEVEL=env.get("NIXL_LOG_LEVEL", "WARN"),
        UCX_MODULES=env.get("UCX_MODULES", "^ib"),
    )
    env.update(extra)
    return env


def free_port() -> int:
    """A port free now and below Linux's ephemeral range (32768-60999 by default): an engine
    binds it a minute or two later, and a port from ``bind(0)`` may by then have been handed
    to another process's connection (seen: a prefill's bootstrap port)."""
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


def start(
    name: str, args: list[str], port: int, log_dir: Path, env: dict[str, str], cwd: Path
) -> Server:
    log = log_dir / f"{name}.log"
    out = open(log, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd
    )
    out.close()
    return Server(name, port, proc, log, args)


def wait_ready(servers: list[Server], timeout: float = 240.0, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            if not s.alive():
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode}:\n{s.tail()}")
            try:
                with urllib.request.urlopen(s.url + path, timeout=2) as r:
                    if r.status == 200:
                        pending.remove(s)
            except (urllib.error.URLError, OSError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"not ready after {timeout}s: {[s.name for s in pending]}\n"
                + "\n".join(f"--- {s.name}:\n{s.tail()}" for s in pending)
            )
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
    # Children (schedulers, engine core, workers) share the group: make sure none is left.
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
        answer: dict[str, Any] = json.loads(r.read())
        return answer
