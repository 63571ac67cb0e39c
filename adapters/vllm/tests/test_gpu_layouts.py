"""vLLM's GPU attention layouts through the real worker half, on CPU.

Each case builds the KV caches exactly as vLLM 0.32 does on a GPU host, with vLLM's own code:
the layout is resolved by ``resolve_kv_cache_layout`` from the attention backend's supported
layouts (``supported_kv_cache_layouts``), ``VLLM_KV_CACHE_LAYOUT`` and
``KvbridgeConnector.get_required_kvcache_layout``; the placement by
``get_kv_cache_config_from_groups``; the tensors by ``allocate_kv_cache`` (one flat buffer,
one strided ``[blocks, heads, tokens, K|V]`` view per layer); the page spec by the backend's
``customize_spec``. Only the device differs. FlashInfer does not import without the
``flashinfer`` package, so its two facts used here are replicated from
``vllm/v1/attention/backends/flashinfer.py`` (``supported_kv_cache_layouts``: LBHNC, BLHNC on
compute capability 10, else no preference; NVFP4's ``customize_spec``: ``2 * num_kv_heads`` head
slots, K slots then V slots).

Then real ``KvbridgeWorker`` objects (prefill and decode, one per TP rank, real kvbridge nodes
over the Fake transport and a real bootstrap server, in this process; only vLLM's TP rank
lookups are patched) hand one request's blocks over, and every K and V vector of every head
and token of every block is compared where the decode backend reads it (the backends split
a ``(block, head, token)`` cell into K and V: ``kv_cache.transpose(1, 2).split(head_size, -1)``
in flash_attn.py, triton_attn.py, flex_attention.py; MLA reads ``kv_cache.squeeze(1)``).

Needs vLLM; skipped without it unless ``KVBRIDGE_VLLM_REQUIRED=1``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

if os.environ.get("KVBRIDGE_VLLM_REQUIRED") == "1":
    import vllm  # noqa: F401  (fail, never skip, in CI)
else:
    pytest.importorskip("vllm")

import torch
import vllm.distributed.parallel_state as parallel_state
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, VllmConfig
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend
from vllm.v1.attention.backends.mla.flashmla import FlashMLABackend
from vllm.v1.attention.backends.mla.triton_mla import TritonMLABackend
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
from vllm.v1.attention.backends.utils import (
    get_supported_kv_cache_layouts,
    resolve_kv_cache_layout,
)
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheLayout,
    MLAAttentionSpec,
)
from vllm.v1.worker.utils import allocate_kv_cache

from kvbridge.bootstrap.server import BootstrapServer
from kvbridge_vllm.config import ConnectorConfig
from kvbridge_vllm.connector import KvbridgeConnector
from kvbridge_vllm.scheduler import KvbridgeMetadata, RecvRoom, SendRoom
from kvbridge_vllm.version import Unsupported
from kvbridge_vllm.worker import KvbridgeWorker

HEADS = 4  # KV heads of the model (split over TP)
HEAD_SIZE = 8
LAYERS = 3
NUM_BLOCKS = 12
LATENT = 40  # MLA: kv_lora_rank 32 + qk_rope_head_dim 8
PREFILL_BLOCKS = [5, 2, 7]
DECODE_BLOCKS = [1, 9, 3]
ROOM = 4242
DEADLINE = 60.0  # seconds a handoff may take before the test gives up (not a timing assert)


class FlashInferLayouts:
    """FlashInferBackend.supported_kv_cache_layouts (replicated: flashinfer is not installed)."""

    def __init__(self, capability_major: int) -> None:
        self.major = capability_major

    def supported_kv_cache_layouts(self) -> tuple[KVCacheLayout, ...] | None:
        if self.major == 10:
            return (KVCacheLayout.LBHNC, KVCacheLayout.BLHNC)
        return None


def flashinfer_nvfp4_spec(spec: FullAttentionSpec) -> FullAttentionSpec:
    """FlashInferBackend.customize_spec for an NVFP4 cache (replicated): K and V as separate
    head slots of packed bytes."""
    return dataclasses.replace(spec, num_head_slots=2 * spec.num_kv_heads, state_content_bytes=8)


# -- vLLM configs ---------------------------------------------------------------------------------


def _write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


COMMON = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 8,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Config-only models (no weights, no tokenizer): a GQA Llama and an MLA DeepSeek-V2."""
    root = tmp_path_factory.mktemp("layout-models")
    llama = {
        **COMMON,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_key_value_heads": HEADS,
        "head_dim": HEAD_SIZE,
    }
    deepseek = {
        **COMMON,
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "num_key_value_heads": 8,
        "moe_intermediate_size": 64,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "first_k_dense_replace": LAYERS,
    }
    return {
        "gqa": _write_config(root / "llama", llama),
        "mla": _write_config(root / "deepseek", deepseek),
    }


@pytest.fixture(scope="module")
def configs(model_dirs: dict[str, Path]) -> dict[tuple[str, str], VllmConfig]:
    """One VllmConfig per (model, kv_role) with KvbridgeConnector on the Fake transport."""
    out = {}
    for model, path in model_dirs.items():
        model_config = ModelConfig(
            model=str(path), skip_tokenizer_init=True, dtype="float16", seed=0
        )
        for role in ("kv_producer", "kv_consumer"):
            kv = KVTransferConfig(
                kv_connector="KvbridgeConnector",
                kv_connector_module_path="kvbridge_vllm",
                kv_role=role,
                kv_connector_extra_config={"kvbridge": {"transport": "fake"}},
            )
            out[model, role] = VllmConfig(
                model_config=model_config,
                cache_config=CacheConfig(block_size=16),
                kv_transfer_config=kv,
                device_config=DeviceConfig("cpu"),
            )
    assert out["mla", "kv_producer"].model_config.use_mla
    assert not out["gqa", "kv_producer"].model_config.use_mla
    return out


# -- one instance's caches, as vLLM allocates them ------------------------------------------------


@attrs.frozen
class Case:
    backend: Any  # what vLLM asks for supported_kv_cache_layouts
    mla: bool = False
    block_size: int = 16
    kernel_block_size: int | None = None
    nvfp4_slots: bool = False  # FlashInfer's NVFP4 head slots


def resolve(config: VllmConfig, case: Case) -> KVCacheLayout:
    """The layout vLLM's engine core would pick for this backend and connector."""
    config.cache_config.kv_cache_layout = None
    names = [layout.name for layout in get_supported_kv_cache_layouts([case.backend])]
    return resolve_kv_cache_layout(config, [names])


def rank_spec(case: Case, tp: int) -> FullAttentionSpec:
    if case.mla:  # as MLAAttention.get_kv_cache_spec: one latent "head", never sharded
        return MLAAttentionSpec(
            block_size=case.block_size,
            num_kv_heads=1,
            max_tp_shards=1,
            head_size=LATENT,
            dtype=torch.float16,
        )
    spec = FullAttentionSpec(
        block_size=case.block_size,
        num_kv_heads=HEADS // tp,
        head_size=HEAD_SIZE,
        dtype=torch.uint8 if case.nvfp4_slots else torch.float16,
    )
    if case.nvfp4_slots:
        return flashinfer_nvfp4_spec(spec)
    customize = getattr(case.backend, "customize_spec", None)
    return customize(spec) if customize is not None else spec


@attrs.frozen
class Instance:
    """One vLLM instance's TP ranks: their layer caches and KV cache configs."""

    layout: KVCacheLayout
    caches: list[dict[str, torch.Tensor]]
    kv_configs: list[KVCacheConfig]
    spec: Any


def allocate(config: VllmConfig, case: Case, tp: int, seed: int | None) -> Instance:
    """Every TP rank's caches through vLLM's own allocation; filled with random values
    (distinct per rank, block, head, token) when ``seed`` is given, else zero as vLLM leaves
    them."""
    layout = resolve(config, case)
    config.cache_config.block_size = case.block_size
    spec = rank_spec(case, tp)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    groups = [KVCacheGroupSpec(layers, spec)]
    caches, kv_configs = [], []
    for rank in range(tp):
        kv_config = get_kv_cache_config_from_groups(
            config, groups, spec.page_size_bytes * LAYERS * NUM_BLOCKS
        )
        assert kv_config.num_blocks == NUM_BLOCKS
        kv_config.kv_cache_layout = layout.name
        kernel = case.kernel_block_size or case.block_size
        rank_caches = allocate_kv_cache(kv_config, torch.device("cpu"), layout, [kernel])
        if seed is not None:
            generator = torch.Generator().manual_seed(seed * 100 + rank)
            for view in rank_caches.values():
                if view.dtype == torch.uint8:
                    view.copy_(torch.randint(1, 256, view.shape, generator=generator))
                else:
                    view.copy_(torch.rand(view.shape, generator=generator) + 0.5)
        caches.append(rank_caches)
        kv_configs.append(kv_config)
    return Instance(layout, caches, kv_configs, spec)


def cells(view: torch.Tensor, block: int, kernel_blocks: int) -> torch.Tensor:
    """``[tokens, heads, content]`` of vLLM block ``block``, as the backends index it: the
    layer view's kernel blocks ``block * kernel_blocks ...``, ``transpose(1, 2)`` (flash_attn.py:
    ``kv_cache.transpose(1, 2).split(head_size, dim=-1)`` splits the content into K and V)."""
    rows = view[block * kernel_blocks : (block + 1) * kernel_blocks]
    return rows.transpose(1, 2).flatten(0, 1)


def key_value(cell: torch.Tensor, mla: bool) -> tuple[torch.Tensor, ...]:
    if mla:
        return (cell,)  # the latent vector (kv_cache.squeeze(1) in mla_attention.py)
    return tuple(cell.split(HEAD_SIZE, dim=-1))


# -- the worker half ------------------------------------------------------------------------------


@pytest.fixture
def bootstrap() -> Iterator[BootstrapServer]:
    server = BootstrapServer("127.0.0.1", 0).start()
    yield server
    server.stop()


@pytest.fixture
def workers() -> Iterator[list[KvbridgeWorker]]:
    made: list[KvbridgeWorker] = []
    yield made
    for worker in made:
        worker.shutdown()


def start_workers(
    monkeypatch: pytest.MonkeyPatch,
    made: list[KvbridgeWorker],
    config: VllmConfig,
    instance: Instance,
    bootstrap_port: int,
    **settings: float,
) -> list[KvbridgeWorker]:
    tp = len(instance.caches)
    extra = {
        "kvbridge": {"transport": "fake", "bind_host": "127.0.0.1"},
        "bootstrap_port": bootstrap_port,
        **settings,
    }
    out = []
    for rank in range(tp):
        # vLLM's parallel state is not initialised in this process: its rank lookups only.
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda r=rank: r)
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: tp)
        worker = KvbridgeWorker(config, ConnectorConfig.from_extra(extra), engine_id="e")
        made.append(worker)
        worker.register_kv_caches(instance.caches[rank], instance.kv_configs[rank])
        out.append(worker)
    return out


def hand_off(
    prefill: list[KvbridgeWorker], decode: list[KvbridgeWorker], bootstrap: BootstrapServer
) -> set[str]:
    """One request: prefill offers its blocks, decode receives into its own. Returns the
    decode ranks' outcome: {"ok"} or {"failed"} (or both when ranks disagree)."""
    for worker in prefill:
        worker.start_load_kv(KvbridgeMetadata(send=[SendRoom("p", ROOM, PREFILL_BLOCKS)]))
    for worker in decode:
        worker.start_load_kv(
            KvbridgeMetadata(recv=[RecvRoom("d", ROOM, DECODE_BLOCKS, bootstrap.address)])
        )
    outcome: dict[int, str] = {}
    deadline = time.monotonic() + DEADLINE
    while len(outcome) < len(decode):
        assert time.monotonic() < deadline, f"decode ranks still waiting: {outcome}"
        for worker in prefill:
            worker.transfer_results()  # vLLM calls get_finished every engine step
        for rank, worker in enumerate(decode):
            _, received, failed = worker.transfer_results()
            if "d" in received:
                outcome[rank] = "failed" if "d" in failed else "ok"
        time.sleep(0.01)
    return set(outcome.values())


def assert_landed(prefill: Instance, decode: Instance, case: Case) -> None:
    """Every K and V vector (MLA: latent vector) of every head and token of the request's
    blocks equals on both sides, read as the decode backend reads it; decode's other blocks
    stay untouched."""
    ptp, dtp = len(prefill.caches), len(decode.caches)
    kernel_blocks = case.block_size // (case.kernel_block_size or case.block_size)
    slots = 2 if case.nvfp4_slots else 1  # NVFP4: slot h is K of head h, HEADS+h its V
    for layer in prefill.caches[0]:
        for d in range(dtp):
            dst = decode.caches[d][layer]
            for pb, db in zip(PREFILL_BLOCKS, DECODE_BLOCKS):
                got = cells(dst, db, kernel_blocks)
                if case.mla:  # replicated: decode rank d reads prefill rank d % prefill TP
                    want = cells(prefill.caches[d % ptp][layer], pb, kernel_blocks)
                    assert torch.equal(got, want), (layer, d, pb)
                    continue
                local = HEADS // dtp
                for head in range(d * local, (d + 1) * local):
                    p, p_head = divmod(head, HEADS // ptp)
                    src = cells(prefill.caches[p][layer], pb, kernel_blocks)
                    for slot in range(slots):
                        dst_slot = slot * local + head - d * local
                        src_slot = slot * (HEADS // ptp) + p_head
                        for g, w in zip(
                            key_value(got[:, dst_slot], case.mla),
                            key_value(src[:, src_slot], case.mla),
                        ):
                            assert torch.equal(g, w), (layer, d, pb, head, slot)
            others = [b for b in range(NUM_BLOCKS) if b not in DECODE_BLOCKS]
            for b in others:
                assert not cells(dst, b, kernel_blocks).any(), (layer, d, b)


def run_pair(
    monkeypatch: pytest.MonkeyPatch,
    made: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    prefill_case: Case,
    decode_case: Case,
    prefill_tp: int,
    decode_tp: int,
    **settings: float,
) -> tuple[Instance, Instance, set[str]]:
    model = "mla" if prefill_case.mla else "gqa"
    p_config, d_config = configs[model, "kv_producer"], configs[model, "kv_consumer"]
    prefill = allocate(p_config, prefill_case, prefill_tp, seed=1)
    decode = allocate(d_config, decode_case, decode_tp, seed=None)
    p_workers = start_workers(monkeypatch, made, p_config, prefill, bootstrap.port, **settings)
    d_workers = start_workers(monkeypatch, made, d_config, decode, bootstrap.port, **settings)
    return prefill, decode, hand_off(p_workers, d_workers, bootstrap)


# -- the layouts ----------------------------------------------------------------------------------

TP_PAIRS = [(1, 1), (2, 2), (1, 2), (2, 1)]
HEAD_MAJOR_BACKENDS = {
    "FLASH_ATTN": FlashAttentionBackend,
    "TRITON_ATTN": TritonAttentionBackend,
    "FLASHINFER": FlashInferLayouts(9),
    "FLASHINFER_SM100": FlashInferLayouts(10),
    "CPU_ATTN": CPUAttentionBackend,
}


@pytest.mark.parametrize("prefill_tp,decode_tp", TP_PAIRS)
@pytest.mark.parametrize("backend", sorted(HEAD_MAJOR_BACKENDS))
def test_head_major_blocks_land_for_every_tp_pair(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    backend: str,
    prefill_tp: int,
    decode_tp: int,
) -> None:
    """The connector asks for LBHNC, vLLM grants it: a rank's heads are one slice of a block,
    so TP 1 -> 2 and 2 -> 1 move each decode rank exactly its heads."""
    case = Case(HEAD_MAJOR_BACKENDS[backend])
    prefill, decode, outcome = run_pair(
        monkeypatch, workers, configs, bootstrap, case, case, prefill_tp, decode_tp
    )
    assert prefill.layout == decode.layout == KVCacheLayout.LBHNC
    assert outcome == {"ok"}
    assert_landed(prefill, decode, case)
    described = workers[0].describe(prefill.caches[0], prefill.kv_configs[0])
    assert described.kv_layout == f"head_sharded:vllm LBHNC {HEAD_SIZE * 2 * 2}B"
    assert len(described.regions) == LAYERS


def test_vllms_hooks_step_the_node_while_the_driver_thread_waits(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
) -> None:
    """start_load_kv and get_finished step the node on vLLM's thread (a decode engine busy-
    polls its worker while requests wait, holding the GIL): with the driver thread's
    interval at an hour, the handoff still completes, driven by the hooks alone."""
    case = Case(FlashAttentionBackend)
    prefill, decode, outcome = run_pair(
        monkeypatch, workers, configs, bootstrap, case, case, 1, 1, poll_interval=3600.0
    )
    assert outcome == {"ok"}
    assert_landed(prefill, decode, case)
    assert all(w.hook_steps > 0 for w in workers)


def test_flex_attention_gets_token_major_blocks_equal_tp_only(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FlexAttention reads only LBNHC: vLLM drops the connector's LBHNC (with a warning) and
    the caches are token-major, which pair with equal TP only."""
    case = Case(FlexAttentionBackend)
    caplog.set_level(logging.WARNING, logger="kvbridge_vllm")
    prefill, decode, outcome = run_pair(monkeypatch, workers, configs, bootstrap, case, case, 2, 2)
    assert prefill.layout == KVCacheLayout.LBNHC
    assert outcome == {"ok"}
    assert_landed(prefill, decode, case)
    assert "pairs only with instances of the same TP size" in caplog.text
    assert "VLLM_KV_CACHE_LAYOUT=LBHNC" in caplog.text


def test_token_major_blocks_with_unequal_tp_are_refused_naming_the_layout(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    case = Case(FlexAttentionBackend)
    caplog.set_level(logging.WARNING, logger="kvbridge")
    _, decode, outcome = run_pair(monkeypatch, workers, configs, bootstrap, case, case, 1, 2)
    assert outcome == {"failed"}
    assert "token_major:vllm LBNHC 32B KV" in caplog.text
    assert "needs equal TP sizes, got prefill 1 and decode 2" in caplog.text
    assert not any(view.any() for caches in decode.caches for view in caches.values())


@pytest.mark.parametrize("layout", ["BLHNC", "BLNHC", "BHLNC", "NHD"])
def test_forced_layouts_land_with_equal_tp(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    layout: str,
) -> None:
    """VLLM_KV_CACHE_LAYOUT beats the connector's wish; blocks outermost (one block holds
    every layer's page: one kvbridge region) and NHD still move whole blocks at equal TP."""
    monkeypatch.setenv("VLLM_KV_CACHE_LAYOUT", layout)
    case = Case(FlashAttentionBackend)
    prefill, decode, outcome = run_pair(monkeypatch, workers, configs, bootstrap, case, case, 2, 2)
    assert prefill.layout.name == {"NHD": "LBNHC"}.get(layout, layout)
    assert outcome == {"ok"}
    assert_landed(prefill, decode, case)
    regions = workers[0].describe(prefill.caches[0], prefill.kv_configs[0]).regions
    assert len(regions) == (LAYERS if layout == "NHD" else 1)


def test_different_layouts_never_pair(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """BLHNC and BLNHC pages have the same size and both map whole pages: only the page
    description in kv_layout tells them apart, and decode refuses the prefill."""
    case = Case(FlashAttentionBackend)
    caplog.set_level(logging.WARNING, logger="kvbridge")
    p_config, d_config = configs["gqa", "kv_producer"], configs["gqa", "kv_consumer"]
    monkeypatch.setenv("VLLM_KV_CACHE_LAYOUT", "BLHNC")
    prefill = allocate(p_config, case, 1, seed=1)
    p_workers = start_workers(monkeypatch, workers, p_config, prefill, bootstrap.port)
    monkeypatch.setenv("VLLM_KV_CACHE_LAYOUT", "BLNHC")
    decode = allocate(d_config, case, 1, seed=None)
    d_workers = start_workers(monkeypatch, workers, d_config, decode, bootstrap.port)
    assert hand_off(p_workers, d_workers, bootstrap) == {"failed"}
    assert (
        "prefill kv_layout is 'token_major:vllm BLHNC 32B' but this decode uses "
        "'token_major:vllm BLNHC 32B'" in caplog.text
    )
    assert not any(view.any() for view in decode.caches[0].values())


def test_heads_outside_blocks_are_refused_at_start_naming_the_switch(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
) -> None:
    """LHBNC (ROCm's native layout) stores each head's blocks as one plane: a block is not
    one run of bytes, so kvbridge cannot describe it as pages."""
    monkeypatch.setenv("VLLM_KV_CACHE_LAYOUT", "LHBNC")
    config = configs["gqa", "kv_consumer"]

    class RocmLike:  # rocm_attn.py: (LHBNC, LBHNC)
        @staticmethod
        def supported_kv_cache_layouts() -> tuple[KVCacheLayout, ...]:
            return (KVCacheLayout.LHBNC, KVCacheLayout.LBHNC)

    instance = allocate(config, Case(RocmLike), 1, seed=None)
    assert instance.layout == KVCacheLayout.LHBNC
    with pytest.raises(Unsupported, match=r"LHBNC.*VLLM_KV_CACHE_LAYOUT=LBHNC"):
        start_workers(monkeypatch, workers, config, instance, bootstrap.port)


@pytest.mark.parametrize(
    "case",
    [
        Case(FlashAttentionBackend, block_size=32, kernel_block_size=16),
        Case(FlashInferLayouts(9), nvfp4_slots=True),
    ],
    ids=["kernel-blocks", "flashinfer-nvfp4-slots"],
)
def test_head_major_pages_that_split_a_ranks_heads_pair_with_equal_tp_only(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    case: Case,
) -> None:
    """LBHNC, but a rank's heads are two or more slices of a vLLM block: a block split into
    kernel blocks (each head-major), or NVFP4's K slots then V slots. Equal TP moves whole
    blocks; unequal TP is refused by the mapping (the worker warned at start)."""
    prefill, decode, outcome = run_pair(monkeypatch, workers, configs, bootstrap, case, case, 2, 2)
    assert prefill.layout == KVCacheLayout.LBHNC
    assert outcome == {"ok"}
    assert_landed(prefill, decode, case)
    kv_layout = workers[0].describe(prefill.caches[0], prefill.kv_configs[0]).kv_layout
    assert kv_layout.startswith("token_major:vllm LBHNC")


@pytest.mark.parametrize(
    "case",
    [
        Case(FlashAttentionBackend, block_size=32, kernel_block_size=16),
        Case(FlashInferLayouts(9), nvfp4_slots=True),
    ],
    ids=["kernel-blocks", "flashinfer-nvfp4-slots"],
)
def test_unequal_tp_with_split_heads_is_refused(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    case: Case,
) -> None:
    """One slice of such a page is not one rank's heads: moving it would be garbage."""
    _, decode, outcome = run_pair(monkeypatch, workers, configs, bootstrap, case, case, 1, 2)
    assert outcome == {"failed"}
    assert not any(view.any() for caches in decode.caches for view in caches.values())


MLA_BACKENDS = {"TRITON_MLA": (TritonMLABackend, 16), "FLASHMLA": (FlashMLABackend, 64)}


@pytest.mark.parametrize("prefill_tp,decode_tp", TP_PAIRS)
@pytest.mark.parametrize("backend", sorted(MLA_BACKENDS))
def test_mla_latent_cache_is_replicated_for_every_tp_pair(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    backend: str,
    prefill_tp: int,
    decode_tp: int,
) -> None:
    """MLA: the connector states no layout (one latent head reads alike in all), every rank
    holds the whole latent cache, decode rank d reads prefill rank d % prefill TP."""
    cls, block_size = MLA_BACKENDS[backend]
    case = Case(cls, mla=True, block_size=block_size)
    prefill, decode, outcome = run_pair(
        monkeypatch, workers, configs, bootstrap, case, case, prefill_tp, decode_tp
    )
    assert outcome == {"ok"}
    assert_landed(prefill, decode, case)
    kv_layout = workers[0].describe(prefill.caches[0], prefill.kv_configs[0]).kv_layout
    assert kv_layout == f"replicated:vllm LBHNC {LATENT * 2}B"


def test_required_layout_is_head_major_except_for_mla(
    configs: dict[tuple[str, str], VllmConfig],
) -> None:
    assert KvbridgeConnector.get_required_kvcache_layout(configs["gqa", "kv_consumer"]) == "LBHNC"
    assert KvbridgeConnector.get_required_kvcache_layout(configs["mla", "kv_consumer"]) is None
    # What vLLM makes of it: granted where the backend has no preference of its own.
    assert resolve(configs["gqa", "kv_consumer"], Case(FlashAttentionBackend)).name == "LBHNC"
    assert resolve(configs["mla", "kv_consumer"], Case(TritonMLABackend)).name == "LBNHC"


def test_a_request_decode_never_received_frees_the_prefills_blocks_at_once(
    monkeypatch: pytest.MonkeyPatch,
    workers: list[KvbridgeWorker],
    configs: dict[tuple[str, str], VllmConfig],
    bootstrap: BootstrapServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Prefill offered its blocks (both legs were sent at once); decode's request ended before
    vLLM allocated it any block, so decode's nodes never had the room. The scheduler half's
    ``abandon`` makes each decode rank tell the prefill, which frees the blocks now instead
    of after ``bootstrap_timeout`` (300 s here, far beyond the deadline)."""
    case = Case(FlashAttentionBackend)
    p_config, d_config = configs["gqa", "kv_producer"], configs["gqa", "kv_consumer"]
    prefill = allocate(p_config, case, 1, seed=1)
    decode = allocate(d_config, case, 2, seed=None)
    p_workers = start_workers(monkeypatch, workers, p_config, prefill, bootstrap.port)
    d_workers = start_workers(monkeypatch, workers, d_config, decode, bootstrap.port)
    p_workers[0].start_load_kv(KvbridgeMetadata(send=[SendRoom("p", ROOM, PREFILL_BLOCKS)]))
    for worker in d_workers:
        worker.start_load_kv(KvbridgeMetadata(abandon=[(ROOM, bootstrap.address)]))
    deadline = time.monotonic() + DEADLINE
    with caplog.at_level(logging.WARNING, logger="kvbridge"):
        while "p" not in p_workers[0].transfer_results()[0]:
            assert time.monotonic() < deadline, "prefill still holds the abandoned room"
            for worker in d_workers:
                worker.transfer_results()
            time.sleep(0.01)
    assert "decode will not receive this request's KV" in caplog.text
    assert not any(decode.caches[r][layer].any() for r in (0, 1) for layer in decode.caches[r])
