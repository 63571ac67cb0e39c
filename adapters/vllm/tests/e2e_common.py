"""What the end-to-end tests share: the tiny model, the single-instance reference outputs,
the prompts, and a prefill/decode pair of real vLLM servers behind vllm-router (the real one,
from the package index), once in each of its modes."""

from __future__ import annotations

import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import legs
import pytest
import vllm_servers as vs

from kvbridge.testing.tiny_model import build, prompt

# Prompt lengths in tokens (one word = one token): under, at and over a 128-token block.
PROMPTS = [prompt(n, seed) for seed, n in enumerate((20, 127, 128, 200, 300, 420))]
MAX_TOKENS = 12
#: Every test of a pair runs once per transport: Fake and Mooncake by default. NIXL
#: (`KVBRIDGE_VLLM_TRANSPORTS=fake,mooncake,nixl`) passed in most runs here, but in a
#: clean-clone CI run its first transfers stalled a worker past 15 s on this 2-vCPU VM (see
#: adapters/vllm/README.md, "Logs and liveness"); NIXL's protocol paths stay covered by the
#: core suite (fence, partition, restart, device memory).
TRANSPORTS = os.environ.get("KVBRIDGE_VLLM_TRANSPORTS", "fake,mooncake").split(",")


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
    def __init__(
        self,
        model: Path,
        logs: Path,
        transport: str,
        decode_tp: int = 1,
        failure_policy: str = "recompute",
        tag: str = "",
        **kvbridge: Any,
    ) -> None:
        """``kvbridge``: settings for both instances on top of ``vs.kv_config``'s;
        ``failure_policy``: decode's ``kv_load_failure_policy``; ``tag``: ends the servers'
        (and their logs') names."""
        self.model, self.logs, self.transport = model, logs, transport
        self.failure_policy = failure_policy
        self.tag = tag
        self.settings = kvbridge
        self.boot = vs.free_port()
        #: Prefill's engine id, asked once per prefill process as the routers do.
        self._engine: str | None = None
        self.prefill = self.start_prefill()
        self.decode = vs.start_vllm(
            f"decode-{transport}" + (f"-tp{decode_tp}" if decode_tp > 1 else "") + tag,
            model,
            logs,
            vs.kv_config("kv_consumer", transport, vs.free_port(), failure_policy, **kvbridge),
            tp=decode_tp,
        )
        #: vllm-router in front, in each mode: ``mooncake`` (it asks prefill's ``GET /query``
        #: and builds decode's params) and ``nixl`` (it relays the params prefill returned).
        self.routers = {
            mode: vs.start_router(self.prefill, self.decode, self.boot, mode, logs, tag)
            for mode in ("mooncake", "nixl")
        }

    @property
    def url(self) -> str:
        """Where clients send requests: vllm-router in Mooncake mode."""
        return self.routers["mooncake"].url

    def both_legs(self, body: dict[str, Any], **options: Any) -> Coroutine[Any, Any, Any]:
        """Both legs of ``body`` at once, as llm-d and SGLang's gateway send them
        (:func:`legs.both_legs`; the engine id from prefill's ``GET /query``, asked once per
        prefill process: a request sent after the prefill died then fails on its legs, as
        through a router, not in the client's own look-up)."""
        return legs.both_legs(
            self.prefill.url, self.decode.url, self.boot, self.engine_id(), body, **options
        )

    def engine_id(self) -> str:
        if self._engine is None:
            self._engine = legs.engine_id(self.boot)
        return self._engine

    @property
    def servers(self) -> list[vs.Server]:
        return [self.prefill, self.decode, *self.routers.values()]

    def start_prefill(self, port: int | None = None) -> vs.Server:
        self._engine = None  # a new process: a new engine id
        return vs.start_vllm(
            f"prefill-{self.transport}{self.tag}",
            self.model,
            self.logs,
            vs.kv_config("kv_producer", self.transport, self.boot, **self.settings),
            port=port,
        )

    def stop(self) -> None:
        for s in (*self.routers.values(), self.decode, self.prefill):
            vs.stop(s)


#: How often a pair starts again on fresh ports when a server lost one (see start_pair).
PORT_ATTEMPTS = 3


def lost_a_port(servers: list[vs.Server]) -> bool:
    """Whether a server that exited could not bind one of its ports."""
    for s in servers:
        if not s.alive():
            try:
                if "address already in use" in s.log.read_text(errors="replace"):
                    return True
            except OSError:
                pass
    return False


def start_pair(*args: Any, **kwargs: Any) -> Pair:
    """A :class:`Pair` whose servers all answer.

    A port is probed free in this process and bound by the engine up to a minute later, and
    in between another process on the host may take it (seen in CI: prefill's bootstrap port
    answered by some other HTTP server). Only that failure starts the pair again, on fresh
    ports; any other failure to start is the test's.
    """
    for attempt in range(1, PORT_ATTEMPTS + 1):
        pair = Pair(*args, **kwargs)
        try:
            vs.wait_ready(pair.servers)
            return pair
        except RuntimeError:
            lost = lost_a_port(pair.servers)
            pair.stop()
            if not lost or attempt == PORT_ATTEMPTS:
                raise
            logging.getLogger(__name__).warning(
                "a server lost its port to another process (attempt %d); starting the pair "
                "again on fresh ports",
                attempt,
            )
    raise AssertionError("unreachable")


def sources(server: vs.Server) -> dict[str, float]:
    """Decode's prompt tokens by where they came from (vLLM's own counter)."""
    m = vs.metrics(server)
    return {
        src: m.get(f'vllm:prompt_tokens_by_source_total{{source="{src}"}}', 0.0)
        for src in ("local_compute", "local_cache_hit", "external_kv_transfer")
    }


def assert_every_prompt_handed_off(
    pair: Pair, model: Path, baseline: dict[str, str], url: str | None = None
) -> None:
    """Greedy outputs through the pair (``url``: a router; its Mooncake-mode one by default)
    equal the single instance's, and vLLM's own counters show no prompt token computed on
    decode: each came over kvbridge, or from decode's prefix cache of an earlier transfer."""
    before = sources(pair.decode)
    for p in PROMPTS:
        out = vs.complete(url or pair.url, model, p, MAX_TOKENS)
        assert out["choices"][0]["text"] == baseline[p], p[:40]
    after = sources(pair.decode)
    delta = {k: after[k] - before[k] for k in after}
    total = sum(len(p.split()) for p in PROMPTS)
    assert delta["local_compute"] == 0, delta
    assert delta["external_kv_transfer"] + delta["local_cache_hit"] == total, delta
    assert delta["external_kv_transfer"] > 0, delta
