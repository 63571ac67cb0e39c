"""The scheduler half of KvbridgeConnector, driven by vLLM's real v1 ``Scheduler``.

No workers and no model: the scheduler runs in-process on a KV cache config built here, and
the test plays the model runner, handing back ``ModelRunnerOutput`` with the
``KVConnectorOutput`` (finished_recving, failed_recving, finished_sending) that the workers'
kvbridge nodes would report. This proves the contract between ``kvbridge_vllm.scheduler`` and
vLLM's scheduler: which blocks are handed to the workers, when vLLM frees them and when a
room is released.

Needs vLLM; skipped without it unless ``KVBRIDGE_VLLM_REQUIRED=1`` (set by ``.ci/run``), which
makes a missing vLLM fail.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("KVBRIDGE_VLLM_REQUIRED") == "1":
    import vllm  # noqa: F401  (fail, never skip, in CI)
else:
    pytest.importorskip("vllm")

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from kvbridge_vllm.connector import KvbridgeConnector
from kvbridge_vllm.rooms import room_of
from kvbridge_vllm.scheduler import KvbridgeMetadata, KvbridgeScheduler, RecvRoom, SendRoom

BLOCK = 16
NUM_BLOCKS = 64
PROMPT = 40  # tokens: three blocks, the last one partly filled
TOKEN = 7  # what the pretend model samples (never EOS: the tiny config's EOS is 2)
PREFILL_ADDR = "127.0.0.1:9"  # the prefill bootstrap server a decode request names

init_none_hash(sha256)


# -- building a scheduler -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama config with no weights and no tokenizer: all the scheduler reads of a model."""
    out = tmp_path_factory.mktemp("config-only-llama")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MakeScheduler = Callable[..., Scheduler]


@pytest.fixture
def make_scheduler(model_dir: Path) -> Iterator[MakeScheduler]:
    """Builds vLLM schedulers with KvbridgeConnector (Fake transport); shuts them all down."""
    made: list[Scheduler] = []

    def make(role: str, *, failure_policy: str = "fail") -> Scheduler:
        kv = KVTransferConfig(
            kv_connector="KvbridgeConnector",
            kv_connector_module_path="kvbridge_vllm",
            kv_role=role,
            kv_load_failure_policy=failure_policy,
            kv_connector_extra_config={
                "kvbridge": {"transport": "fake"},
                "bootstrap_port": _free_port(),
            },
        )
        config = VllmConfig(
            model_config=ModelConfig(
                model=str(model_dir), skip_tokenizer_init=True, dtype="float32", seed=0
            ),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
            scheduler_config=SchedulerConfig(
                max_num_seqs=8,
                max_num_batched_tokens=256,
                max_model_len=2048,
                enable_chunked_prefill=True,
                is_encoder_decoder=False,
            ),
            kv_transfer_config=kv,
            device_config=DeviceConfig("cpu"),
        )
        config.cache_config.num_gpu_blocks = NUM_BLOCKS
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
        kv_cache = KVCacheConfig(
            num_blocks=NUM_BLOCKS,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)],
        )
        scheduler = Scheduler(
            vllm_config=config,
            kv_cache_config=kv_cache,
            structured_output_manager=StructuredOutputManager(config),
            block_size=BLOCK,
        )
        made.append(scheduler)
        assert isinstance(scheduler.connector, KvbridgeConnector)
        assert scheduler.connector.kb_scheduler is not None
        return scheduler

    yield make
    for scheduler in made:
        scheduler.shutdown()


def make_request(
    request_id: str, params: dict[str, Any] | None, *, max_tokens: int = 3, seed: int = 0
) -> Request:
    prompt = [10 + (seed * 31 + i) % 200 for i in range(PROMPT)]
    request = Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=max_tokens),
        pooling_params=None,
        block_hasher=get_request_block_hasher(BLOCK, sha256),
    )
    request.kv_transfer_params = dict(params) if params is not None else None
    return request


# -- playing the model runner ---------------------------------------------------------------------


def step(
    scheduler: Scheduler, **kv_output: set[str]
) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """One engine step: schedule, then report one sampled token per scheduled request that
    is past its prompt (none for a prefill chunk) and ``kv_output`` (the KVConnectorOutput
    fields the workers would report this step)."""
    out = scheduler.schedule()
    req_ids = list(out.num_scheduled_tokens)
    chunk = {r for r in req_ids if scheduler.requests[r].is_prefill_chunk}
    runner = ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[] if r in chunk else [TOKEN] for r in req_ids],
        kv_connector_output=KVConnectorOutput(**kv_output) if kv_output else None,
    )
    engine_outputs = scheduler.update_from_output(out, runner)
    return out, [o for group in engine_outputs.values() for o in group.outputs]


def meta(out: SchedulerOutput) -> KvbridgeMetadata:
    m = out.kv_connector_metadata
    assert isinstance(m, KvbridgeMetadata)
    # vLLM ships it to every worker: it must survive pickling.
    assert pickle.loads(pickle.dumps(m)) == m
    return m


def kb(scheduler: Scheduler) -> KvbridgeScheduler:
    connector = scheduler.connector
    assert isinstance(connector, KvbridgeConnector)
    assert connector.kb_scheduler is not None
    return connector.kb_scheduler


def free_blocks(scheduler: Scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def block_ids(scheduler: Scheduler, request_id: str) -> list[int]:
    (ids,) = scheduler.kv_cache_manager.get_block_ids(request_id)
    return list(ids)


def remote_prefill(transfer_id: str) -> dict[str, Any]:
    return {
        "do_remote_prefill": True,
        "transfer_id": transfer_id,
        "remote_bootstrap_addr": PREFILL_ADDR,
    }


def receive(scheduler: Scheduler, request: Request, transfer_id: str) -> RecvRoom:
    """Add a remote-prefill request and schedule it: it waits for its KV, handed to the
    workers as one RecvRoom."""
    scheduler.add_request(request)
    out, outputs = step(scheduler)
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert out.num_scheduled_tokens == {}  # nothing to compute while the KV is on its way
    assert outputs == []
    recv = [r for r in meta(out).recv if r.request_id == request.request_id]
    assert len(recv) == 1
    (room,) = recv
    assert room.room == room_of(transfer_id)
    assert room.bootstrap_addr == PREFILL_ADDR
    # The blocks vLLM's KV cache manager allocated for the whole prompt, nothing else.
    assert room.block_ids == block_ids(scheduler, request.request_id)
    assert len(room.block_ids) == -(-PROMPT // BLOCK)
    return room


# -- decode (kv_consumer) -------------------------------------------------------------------------


def test_decode_receives_into_allocated_blocks_then_runs(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_consumer")
    free_before = free_blocks(sched)
    request = make_request("d1", remote_prefill("t1"), max_tokens=2)
    room = receive(sched, request, "t1")
    assert kb(sched).rooms.owner(room.room) == "d1"
    assert free_blocks(sched) == free_before - len(room.block_ids)

    # The workers have not reported yet: it keeps waiting, nothing is shipped again.
    out, _ = step(sched)
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert meta(out) == KvbridgeMetadata()

    # Every worker reports the room received: vLLM schedules the last prompt token only.
    step(sched, finished_recving={"d1"})
    out, outputs = step(sched)
    assert out.num_scheduled_tokens == {"d1": 1}
    assert request.status == RequestStatus.RUNNING
    assert block_ids(sched, "d1") == room.block_ids  # computed in the blocks that received
    assert meta(out) == KvbridgeMetadata()
    assert [o.new_token_ids for o in outputs] == [[TOKEN]]
    assert kb(sched).rooms.owner(room.room) == "d1"  # held while the request lives

    out, outputs = step(sched)
    assert out.num_scheduled_tokens == {"d1": 1}
    assert outputs[0].finish_reason is not None
    assert request.is_finished()
    assert len(kb(sched).rooms) == 0
    assert kb(sched).receiving == set()
    assert free_blocks(sched) == free_before


def test_decode_client_abort_waits_for_the_workers(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_consumer")
    free_before = free_blocks(sched)
    request = make_request("d1", remote_prefill("t1"))
    room = receive(sched, request, "t1")
    held = free_blocks(sched)
    assert held == free_before - len(room.block_ids)
    usage = sched.get_kv_cache_usage()
    assert usage > 0

    # The client goes away while the KV is on its way: the transport may still write into
    # the blocks, so vLLM must not reuse them yet, and the workers are told to abort.
    sched.finish_requests("d1", RequestStatus.FINISHED_ABORTED)
    assert free_blocks(sched) == held
    assert sched.get_kv_cache_usage() == usage
    assert "d1" in sched.requests
    out, _ = step(sched)
    assert meta(out).abort == [("d1", room.room)]
    assert meta(out).recv == []
    assert free_blocks(sched) == held
    assert sched.has_requests()  # vLLM keeps stepping, so the workers' report gets through
    assert kb(sched).rooms.owner(room.room) == "d1"  # a new request may not take it yet

    # A second abort is not sent twice.
    out, _ = step(sched)
    assert meta(out).abort == []

    # The workers report it ended (the abort fence lifted): now the blocks go back and the
    # room is free.
    step(sched, finished_recving={"d1"}, failed_recving={"d1"})
    assert free_blocks(sched) == free_before
    assert sched.get_kv_cache_usage() == 0
    assert "d1" not in sched.requests
    assert len(kb(sched).rooms) == 0
    assert kb(sched).aborting == set()
    assert kb(sched).receiving == set()


def test_decode_abort_after_the_kv_landed_frees_at_once(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_consumer")
    free_before = free_blocks(sched)
    request = make_request("d1", remote_prefill("t1"))
    receive(sched, request, "t1")
    step(sched, finished_recving={"d1"})
    # Received, not yet scheduled, when the client goes away: nothing is in flight any more,
    # so the blocks and the room go back now and the workers are told nothing.
    sched.finish_requests("d1", RequestStatus.FINISHED_ABORTED)
    assert free_blocks(sched) == free_before
    assert "d1" not in sched.requests
    assert len(kb(sched).rooms) == 0
    out, _ = step(sched)
    assert meta(out) == KvbridgeMetadata()


def test_decode_abort_before_blocks_tells_the_prefill(make_scheduler: MakeScheduler) -> None:
    """Ended while it waited to be scheduled: no blocks, nothing for the workers' nodes to
    end, but the prefill may hold the room (a router sends both legs at once). The workers
    are told to abandon it, so their nodes tell that prefill now."""
    sched = make_scheduler("kv_consumer")
    free_before = free_blocks(sched)
    request = make_request("d1", remote_prefill("t9"))
    sched.add_request(request)
    sched.finish_requests("d1", RequestStatus.FINISHED_ABORTED)
    assert "d1" not in sched.requests
    out, _ = step(sched)
    assert meta(out) == KvbridgeMetadata(abandon=[(room_of("t9"), PREFILL_ADDR)])
    assert free_blocks(sched) == free_before
    assert len(kb(sched).rooms) == 0
    out, _ = step(sched)
    assert meta(out) == KvbridgeMetadata()  # told once


def test_decode_local_prefix_hit_receives_only_the_rest(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_consumer")
    first = make_request("d1", remote_prefill("t1"), max_tokens=1)
    receive(sched, first, "t1")
    step(sched, finished_recving={"d1"})
    step(sched)
    assert first.is_finished()  # its two full blocks stay in vLLM's prefix cache

    # The same prompt again under another transfer id: vLLM reuses the two cached blocks and
    # the transfer covers only the block past them (prefill then sends its last block).
    second = make_request("d2", remote_prefill("t3"), max_tokens=1)
    sched.add_request(second)
    out, _ = step(sched)
    assert second.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    allocated = block_ids(sched, "d2")
    assert len(allocated) == 3
    assert meta(out).recv == [RecvRoom("d2", room_of("t3"), allocated[2:], PREFILL_ADDR)]


def test_decode_failed_receive_is_recomputed(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_consumer", failure_policy="recompute")
    free_before = free_blocks(sched)
    request = make_request("d1", remote_prefill("t1"), max_tokens=1)
    receive(sched, request, "t1")

    # The workers report the room failed (kvbridge says the blocks are safe to reuse): vLLM
    # 0.32 reads failed_recving (by request) together with finished_recving.
    step(sched, finished_recving={"d1"}, failed_recving={"d1"})
    out, outputs = step(sched)
    # The whole prompt is computed here, and no second transfer is started for it.
    assert out.num_scheduled_tokens == {"d1": PROMPT}
    assert meta(out) == KvbridgeMetadata()
    assert request.status != RequestStatus.WAITING_FOR_REMOTE_KVS
    assert [o.new_token_ids for o in outputs] == [[TOKEN]]
    assert request.is_finished()
    assert len(kb(sched).rooms) == 0
    assert free_blocks(sched) == free_before


def test_decode_failed_receive_with_fail_policy_ends_the_request(
    make_scheduler: MakeScheduler,
) -> None:
    sched = make_scheduler("kv_consumer")  # vLLM's default policy: fail
    free_before = free_blocks(sched)
    request = make_request("d1", remote_prefill("t1"))
    receive(sched, request, "t1")
    _, outputs = step(sched, finished_recving={"d1"}, failed_recving={"d1"})
    assert [o.request_id for o in outputs] == ["d1"]
    assert request.status == RequestStatus.FINISHED_ERROR
    assert free_blocks(sched) == free_before
    assert len(kb(sched).rooms) == 0
    assert kb(sched).receiving == set()
    assert kb(sched).aborting == set()


def test_decode_reused_transfer_id_is_computed_locally(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_consumer")
    first = make_request("d1", remote_prefill("t1"), max_tokens=1, seed=1)
    second = make_request("d2", remote_prefill("t1"), max_tokens=1, seed=2)
    sched.add_request(first)
    sched.add_request(second)
    out, outputs = step(sched)
    # The first waits for its KV; the second is computed here, in the same step.
    assert first.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert [r.request_id for r in meta(out).recv] == ["d1"]
    assert meta(out).recv[0].block_ids == block_ids(sched, "d1")
    assert out.num_scheduled_tokens == {"d2": PROMPT}
    assert meta(out).abandon == []  # the room is d1's: the prefill must not hear d2 gave up
    assert [o.request_id for o in outputs] == ["d2"]
    assert second.is_finished()
    # The second ending does not release the first's room.
    assert kb(sched).rooms.owner(room_of("t1")) == "d1"
    assert kb(sched).receiving == {"d1"}

    step(sched, finished_recving={"d1"})
    out, outputs = step(sched)
    assert out.num_scheduled_tokens == {"d1": 1}
    assert first.is_finished()
    assert len(kb(sched).rooms) == 0


def test_decode_later_request_may_reuse_a_released_transfer_id(
    make_scheduler: MakeScheduler,
) -> None:
    sched = make_scheduler("kv_consumer")
    first = make_request("d1", remote_prefill("t1"), max_tokens=1, seed=1)
    receive(sched, first, "t1")
    step(sched, finished_recving={"d1"})
    step(sched)
    assert first.is_finished()
    # Only live requests collide: once d1 ended, the id may come again (a retried request).
    receive(sched, make_request("d2", remote_prefill("t1"), seed=2), "t1")
    assert kb(sched).rooms.owner(room_of("t1")) == "d2"


# -- prefill (kv_producer) ------------------------------------------------------------------------


def test_prefill_offers_its_blocks_until_sent(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_producer")
    free_before = free_blocks(sched)
    request = make_request("p1", {"do_remote_decode": True, "transfer_id": "t2"}, max_tokens=1)
    sched.add_request(request)
    out, outputs = step(sched)
    assert out.num_scheduled_tokens == {"p1": PROMPT}
    assert meta(out) == KvbridgeMetadata()  # nothing to send before it finished
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED

    (output,) = outputs
    params = output.kv_transfer_params
    assert params is not None
    boot = kb(sched).bootstrap_addr
    assert params["do_remote_prefill"] is True
    assert params["transfer_id"] == "t2"
    assert params["remote_bootstrap_addr"] == boot
    assert params["remote_room"] == room_of("t2")
    assert params["remote_engine_id"] == sched.vllm_config.kv_transfer_config.engine_id
    connector = sched.connector
    assert isinstance(connector, KvbridgeConnector)
    assert connector.bootstrap is not None
    assert boot.endswith(f":{connector.kb_config.bootstrap_port}")

    # vLLM keeps the blocks (delay-free) and the next step tells the workers to send them.
    held = block_ids(sched, "p1")
    assert len(held) == -(-PROMPT // BLOCK)
    assert free_blocks(sched) == free_before - len(held)
    assert sched.has_requests()  # pending push work keeps the engine stepping
    out, _ = step(sched)
    assert meta(out).send == [SendRoom("p1", room_of("t2"), held)]
    assert meta(out).recv == []
    out, _ = step(sched)
    assert meta(out).send == []  # sent once
    assert free_blocks(sched) == free_before - len(held)
    assert kb(sched).rooms.owner(room_of("t2")) == "p1"

    # Every worker reports the room sent: blocks freed, room released.
    step(sched, finished_sending={"p1"})
    assert free_blocks(sched) == free_before
    assert "p1" not in sched.requests
    assert len(kb(sched).rooms) == 0
    assert not sched.has_requests()


def test_prefill_reused_transfer_id_is_not_offered(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_producer")
    free_before = free_blocks(sched)
    params = {"do_remote_decode": True, "transfer_id": "t2"}
    first = make_request("p1", params, max_tokens=1, seed=1)
    second = make_request("p2", params, max_tokens=1, seed=2)
    sched.add_request(first)
    sched.add_request(second)
    _, outputs = step(sched)
    by_id = {o.request_id: o for o in outputs}
    assert by_id["p1"].kv_transfer_params is not None
    assert by_id["p1"].kv_transfer_params["remote_room"] == room_of("t2")
    # The second holds nothing: no params (a router then decodes it as a plain request), its
    # blocks freed at once, the first's room untouched.
    assert by_id["p2"].kv_transfer_params is None
    assert "p2" not in sched.requests
    held = block_ids(sched, "p1")
    assert free_blocks(sched) == free_before - len(held)
    out, _ = step(sched)
    assert meta(out).send == [SendRoom("p1", room_of("t2"), held)]
    assert kb(sched).rooms.owner(room_of("t2")) == "p1"
    step(sched, finished_sending={"p1"})
    assert free_blocks(sched) == free_before
    assert len(kb(sched).rooms) == 0


def test_prefill_aborted_request_offers_nothing(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler("kv_producer")
    free_before = free_blocks(sched)
    # Prefilled in two chunks: the client goes away after the first.
    sched.scheduler_config.max_num_batched_tokens = BLOCK
    sched.max_num_scheduled_tokens = BLOCK
    request = make_request("p1", {"do_remote_decode": True, "transfer_id": "t2"}, max_tokens=1)
    sched.add_request(request)
    out, outputs = step(sched)
    assert out.num_scheduled_tokens == {"p1": BLOCK}
    assert outputs == []
    sched.finish_requests("p1", RequestStatus.FINISHED_ABORTED)
    assert free_blocks(sched) == free_before
    assert "p1" not in sched.requests
    out, _ = step(sched)
    # Nothing offered, but the workers end the room: a router that sent both legs at once
    # may have a decode waiting for it already, and it is told now.
    assert meta(out) == KvbridgeMetadata(abort=[("p1", room_of("t2"))])
    assert len(kb(sched).rooms) == 0
    assert kb(sched).sending == set()
    assert not sched.has_requests()


def test_prefill_mints_a_transfer_id_for_routers_that_send_none(
    make_scheduler: MakeScheduler,
) -> None:
    """vllm-router's NIXL mode (and llm-d's nixlv2) sends prefill NIXL's params without a
    ``transfer_id`` and relays the params prefill returns to decode verbatim."""
    sched = make_scheduler("kv_producer")
    nixl_style = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    first = make_request("p1", dict(nixl_style), max_tokens=1, seed=1)
    second = make_request("p2", dict(nixl_style), max_tokens=1, seed=2)
    sched.add_request(first)
    sched.add_request(second)
    _, outputs = step(sched)
    params = {o.request_id: o.kv_transfer_params for o in outputs}
    ids = {r: p["transfer_id"] for r, p in params.items() if p is not None}
    assert set(ids) == {"p1", "p2"} and ids["p1"] != ids["p2"]
    for request_id, p in params.items():
        assert p is not None and p["do_remote_prefill"] is True
        assert p["remote_room"] == room_of(ids[request_id])
        assert p["remote_bootstrap_addr"] == kb(sched).bootstrap_addr
    out, _ = step(sched)
    assert {(s.request_id, s.room) for s in meta(out).send} == {
        (r, room_of(t)) for r, t in ids.items()
    }


@pytest.mark.parametrize("bad", ["", 7, ["t"]])
def test_prefill_refuses_a_transfer_id_that_is_not_a_string(
    make_scheduler: MakeScheduler, bad: Any
) -> None:
    sched = make_scheduler("kv_producer")
    free_before = free_blocks(sched)
    sched.add_request(
        make_request("p1", {"do_remote_decode": True, "transfer_id": bad}, max_tokens=1)
    )
    (output,) = step(sched)[1]
    assert output.kv_transfer_params is None  # not offered; a router decodes it locally
    assert free_blocks(sched) == free_before
    assert meta(step(sched)[0]) == KvbridgeMetadata()
