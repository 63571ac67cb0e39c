"""End to end with a real vLLM: a prefill and a decode instance serving HTTP, the kvbridge
proxy in front, the Fake, Mooncake and NIXL transports, compared against one plain instance.

Needs the vLLM environment (``adapters/vllm/scripts/make_env.sh``); skipped without vLLM
unless ``KVBRIDGE_VLLM_REQUIRED=1`` (set by ``.ci/run``), which makes a missing vLLM fail.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

if os.environ.get("KVBRIDGE_VLLM_REQUIRED") == "1":
    import vllm  # noqa: F401  (fail, never skip, in CI)
else:
    pytest.importorskip("vllm")

import vllm_servers as vs
from kvbridge_vllm.tiny_model import build, prompt

# Prompt lengths in tokens (one word = one token): under, at and over a 128-token block.
PROMPTS = [prompt(n, seed) for seed, n in enumerate((20, 127, 128, 200, 300, 420))]
MAX_TOKENS = 12
#: CI runs the Fake pair; `KVBRIDGE_VLLM_TRANSPORTS=fake,mooncake,nixl` runs the others too
#: (they passed here, but one Mooncake and one NIXL run each lost a room to a 10 s heartbeat
#: gap that is still being chased: see adapters/vllm/README.md).
TRANSPORTS = os.environ.get("KVBRIDGE_VLLM_TRANSPORTS", "fake").split(",")


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-logs")


@pytest.fixture(scope="session")
def baseline(model: Path, logs: Path) -> dict[str, str]:
    """Greedy outputs of one plain (non-disaggregated) instance."""
    server = vs.start_vllm("single", model, logs)
    try:
        vs.wait_ready([server])
        return {
            p: vs.complete(server.url, model, p, MAX_TOKENS)["choices"][0]["text"] for p in PROMPTS
        }
    finally:
        vs.stop(server)


class Pair:
    def __init__(self, model: Path, logs: Path, transport: str) -> None:
        self.model, self.logs, self.transport = model, logs, transport
        self.boot = vs.free_port()
        self.prefill = self.start_prefill()
        self.decode = vs.start_vllm(
            f"decode-{transport}",
            model,
            logs,
            vs.kv_config("kv_consumer", transport, vs.free_port()),
        )
        self.proxy = vs.start_proxy(self.prefill, self.decode, logs)

    def start_prefill(self, port: int | None = None) -> vs.Server:
        return vs.start_vllm(
            f"prefill-{self.transport}",
            self.model,
            self.logs,
            vs.kv_config("kv_producer", self.transport, self.boot),
            port=port,
        )

    def stop(self) -> None:
        for s in (self.proxy, self.decode, self.prefill):
            vs.stop(s)


@pytest.fixture(scope="module", params=TRANSPORTS)
def pair(request: pytest.FixtureRequest, model: Path, logs: Path, baseline: dict[str, str]):
    p = Pair(model, logs, request.param)
    try:
        vs.wait_ready([p.prefill, p.decode, p.proxy])
        yield p
    finally:
        p.stop()


def _sources(server: vs.Server) -> dict[str, float]:
    m = vs.metrics(server)
    return {
        src: m.get(f'vllm:prompt_tokens_by_source_total{{source="{src}"}}', 0.0)
        for src in ("local_compute", "local_cache_hit", "external_kv_transfer")
    }


def test_outputs_equal_single_instance_and_decode_used_the_kv(
    pair: Pair, model: Path, baseline: dict[str, str]
) -> None:
    before = _sources(pair.decode)
    for p in PROMPTS:
        out = vs.complete(pair.proxy.url, model, p, MAX_TOKENS)
        assert out["choices"][0]["text"] == baseline[p], p[:40]
    after = _sources(pair.decode)
    delta = {k: after[k] - before[k] for k in after}
    total = sum(len(p.split()) for p in PROMPTS)
    # vLLM's own counters: no prompt token was computed on decode; every one came over
    # kvbridge or from decode's prefix cache of an earlier transfer.
    assert delta["local_compute"] == 0, delta
    assert delta["external_kv_transfer"] + delta["local_cache_hit"] == total, delta
    assert delta["external_kv_transfer"] > 0, delta
    vs.wait_idle([pair.prefill, pair.decode])


# The engine-side abort paths are the same code for every transport: the Fake pair is enough.
@pytest.mark.parametrize("pair", ["fake"], indirect=True)
def test_client_disconnect_leaks_nothing(pair: Pair, model: Path, baseline: dict[str, str]):
    import aiohttp

    async def cut(delay: float, seed: int) -> None:
        body = {
            "model": str(model),
            "prompt": prompt(400, 1000 + seed),
            "max_tokens": 100,
            "temperature": 0.0,
            "stream": seed % 2 == 0,
        }
        async with aiohttp.ClientSession() as session:
            try:
                async with asyncio.timeout(delay):
                    async with session.post(pair.proxy.url + "/v1/completions", json=body) as r:
                        await r.read()
            except TimeoutError:
                pass

    async def main() -> None:
        await asyncio.gather(*(cut(d, i) for i, d in enumerate((0.02, 0.05, 0.1, 0.2, 0.4, 0.8))))

    asyncio.run(main())
    # Everything cut off is aborted and freed (a prefill whose decode never came frees its
    # blocks after bootstrap_timeout, 15 s here).
    vs.wait_idle([pair.prefill, pair.decode], timeout=45)
    for p in PROMPTS[:2]:
        assert (
            vs.complete(pair.proxy.url, model, p, MAX_TOKENS)["choices"][0]["text"] == (baseline[p])
        )


@pytest.mark.parametrize("pair", ["fake"], indirect=True)
def test_prefill_killed_mid_transfer(pair: Pair, model: Path, baseline: dict[str, str]):
    import threading

    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            vs.complete(pair.proxy.url, model, prompt(450, 2000 + seed), 4)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    vs.kill(pair.prefill)
    for t in threads:
        t.join(120)
    # Decode fails the rooms of the dead prefill (liveness: 2 missed 1 s heartbeats) and
    # frees them; nothing stays running, waiting or allocated.
    vs.wait_idle([pair.decode], timeout=60)
    # A new prefill process at the same address serves later requests, KV transferred.
    pair.prefill = pair.start_prefill(port=pair.prefill.port)
    vs.wait_ready([pair.prefill])
    before = _sources(pair.decode)
    for p in PROMPTS[3:]:
        assert (
            vs.complete(pair.proxy.url, model, p, MAX_TOKENS)["choices"][0]["text"] == (baseline[p])
        )
    after = _sources(pair.decode)
    assert after["local_compute"] == before["local_compute"]
    assert after["external_kv_transfer"] > before["external_kv_transfer"]
    vs.wait_idle([pair.prefill, pair.decode])
