"""The processes of test_scheduler_queues.py: SGLang's real decode queues at world 2 over gloo,
and a kvbridge-sglang prefill feeding them. Run as a script (SGLang's environment):

- ``scheduler_ranks.py prefill WORK BOOTSTRAP_PORT``: kvbridge's bootstrap server (SGLang's
  ``BOOTSTRAP_SERVER`` class for the kvbridge backend) and one prefill rank (TP 1): SGLang's KV
  pool, allocator and metadata buffers, the adapter's manager and one sender per room, which
  writes a known pattern into the room's pages and metadata rows once decode asked for them;
- ``scheduler_ranks.py decode WORK BOOTSTRAP_PORT DIST_PORT RANK``: one of two decode ranks
  (TP 2): SGLang's parallel runtime over gloo, its pools, tree cache, metadata buffers,
  ``DecodeTransferQueue`` and ``DecodePreallocQueue`` (whose kvbridge manager comes from the
  plugin's ``get_kv_class``), stepped by SGLang's own ``process_decode_queue``.

The plan (:data:`PHASES`) is the same in every process, so each knows every room. Every process
writes ``WORK/<name>.json`` and ends on its own: the decode ranks stop at the same step, when
both say their rooms ended or their deadline passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from array import array
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import numpy as np

HOST = "127.0.0.1"
DECODE_TP = 2
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64
POOL_TOKENS = 2048
MAX_RUNNING = 32
MAX_NEW_TOKENS = 16
RESERVED_DECODE_TOKENS = 16
#: Seconds a phase may take on this 2-vCPU machine before the ranks give up (then the test fails).
PHASE_DEADLINE = 150.0
#: Steps rank 1's bootstrap answer is held after rank 0 resolved the prefill and the "skewed"
#: requests were added (rank 0 resolves them at once, rank 1 only later).
HOLD_STEPS = 10
STEP_PAUSE = 0.005
#: Seconds the prefill still waits for its rooms' outcomes once both decode ranks are done.
DONE_GRACE = 30.0


@attrs.frozen
class Room:
    room: int
    tokens: int
    #: When it is added: "early" (before either rank resolved the prefill), "skewed" (rank 0
    #: resolved, rank 1 not yet), "late" (both resolved).
    wave: str
    fails_on_rank1: bool = False


def _rooms(base: int, waves: dict[str, int], failing: dict[str, int]) -> tuple[Room, ...]:
    rooms = []
    for wave, count in waves.items():
        for i in range(count + failing.get(wave, 0)):
            room = base + len(rooms)
            rooms.append(Room(room, 8 + (room * 7) % 33, wave, fails_on_rank1=i >= count))
    return tuple(rooms)


#: "lockstep": SGLang as it is. "rank_local": the control, SGLang's MIN over TP ranks replaced
#: by each rank's own answer: the same skew must then show up as queues of different lengths.
PHASES: dict[str, tuple[Room, ...]] = {
    "lockstep": _rooms(1001, {"early": 8, "skewed": 6, "late": 6}, {"skewed": 1, "late": 1}),
    "rank_local": _rooms(2001, {"early": 4, "skewed": 4}, {}),
}
#: Requests added per step within a wave.
PER_STEP = 2
FAILING_ROOMS = sorted(r.room for rooms in PHASES.values() for r in rooms if r.fails_on_rank1)


def fake_faults() -> str:
    """The Fake transport's fault plan (``KVBRIDGE_FAKE_FAULTS``) for every process: the
    failing rooms fail on TP rank 1 only, i.e. on decode rank 1 (the prefill is rank 0)."""
    return json.dumps({"fail_rooms": FAILING_ROOMS, "fail_ranks": [1]})


def kv_value(room: int, layer: int, kind: int, head: int, pos: np.ndarray, dim: np.ndarray) -> Any:
    """What prefill writes at K (kind 0) / V (kind 1) of ``layer``, ``head``, token ``pos``:
    integers exact in float32, distinct for each (room mod 97, position, layer, kind, head, dim)."""
    return (dim * 100_000 + (room % 97) * 1000 + pos * 10 + layer * 4 + kind * 2 + head).astype(
        np.float32
    )


def first_token(room: int) -> int:
    return 3 + room % 200


def cached_tokens(room: int) -> int:
    return room % 5


def _server_args(model: Path, mode: str, tp: int, **extra: Any) -> Any:
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(
        model_path=str(model),
        device="cpu",
        tp_size=tp,
        host=HOST,
        disaggregation_mode=mode,
        disaggregation_transfer_backend="kvbridge",
        skip_tokenizer_init=True,
        attention_backend="torch_native",
        disable_cuda_graph=True,
        disable_custom_all_reduce=True,
        max_total_tokens=POOL_TOKENS,
        max_running_requests=MAX_RUNNING,
        **extra,
    )


def _kv_pool(model_config: Any, tp: int) -> tuple[Any, Any]:
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(
        POOL_TOKENS,
        page_size=1,
        dtype=torch.float32,
        head_num=model_config.get_num_kv_heads(tp),
        head_dim=model_config.head_dim,
        layer_num=model_config.num_hidden_layers,
        device="cpu",
        enable_memory_saver=False,
    )
    allocator = TokenToKVPoolAllocator(
        POOL_TOKENS, dtype=torch.float32, device="cpu", kvcache=pool, need_sort=False
    )
    return pool, allocator


def _metadata_buffers(size: int, server_args: Any) -> Any:
    import torch
    from sglang.srt.disaggregation.utils import MetadataBuffers

    # The sizes SGLang's scheduler uses without speculative decoding.
    return MetadataBuffers(
        size,
        hidden_size=16,
        hidden_states_dtype=torch.float32,
        max_sampling_mask_tokens=server_args.sampling_mask_max_tokens,
    )


def _backend() -> Any:
    from sglang.srt.disaggregation.utils import TransferBackend

    return TransferBackend("kvbridge")


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


# -- prefill -------------------------------------------------------------------------------------


def prefill_main(work: Path, bootstrap_port: int) -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()  # before the imports below: they must see the plugin's get_kv_class
    from sglang.srt import runtime_context
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.disaggregation.base import KVPoll
    from sglang.srt.disaggregation.utils import (
        DisaggregationMode,
        KVClassType,
        ReqToMetadataIdxAllocator,
        get_kv_class,
        get_kv_transfer_buf_infos,
    )

    server_args = _server_args(
        work / "model",
        "prefill",
        1,
        disaggregation_bootstrap_port=bootstrap_port,
        disable_overlap_schedule=True,
    )
    runtime_context.publish(
        server_args, role="scheduler", ranks=runtime_context.SpawnRanks(world_rank=0, gpu_id=0)
    )
    backend = _backend()
    bootstrap = get_kv_class(backend, KVClassType.BOOTSTRAP_SERVER)(host=HOST, port=bootstrap_port)
    model_config = ModelConfig.from_server_args(server_args)
    pool, allocator = _kv_pool(model_config, 1)
    metadata = _metadata_buffers(2 * MAX_RUNNING, server_args)
    slots = ReqToMetadataIdxAllocator(2 * MAX_RUNNING)

    kv_args = get_kv_class(backend, KVClassType.KVARGS)()
    kv_args.engine_rank = 0
    kv_args.pp_rank = 0
    kv_args.kv_cache_dtype_str = "auto"
    kv_args.kv_data_ptrs, kv_args.kv_data_lens, kv_args.kv_item_lens = get_kv_transfer_buf_infos(
        pool
    )
    kv_args.aux_data_ptrs, kv_args.aux_data_lens, kv_args.aux_item_lens = metadata.get_buf_infos()
    kv_args.page_size = 1
    kv_args.state_types = []
    kv_args.gpu_id = 0
    manager = get_kv_class(backend, KVClassType.MANAGER)(
        kv_args, DisaggregationMode.PREFILL, server_args, False
    )
    sender_class = get_kv_class(backend, KVClassType.SENDER)
    addr = f"{HOST}:{bootstrap_port}"
    rooms = {r.room: r for phase in PHASES.values() for r in phase}
    (work / "prefill.ready").write_text(addr)

    senders: dict[int, Any] = {}
    held: dict[int, tuple[Any, int]] = {}  # room -> (its KV indices, its metadata slot)
    outcome: dict[str, str] = {}
    last_status: dict[str, int] = {}  # what each room's sender said last: for a failure report
    deadline = time.monotonic() + PHASE_DEADLINE * (len(PHASES) + 1)
    while len(outcome) < len(rooms) and time.monotonic() < deadline:
        if all((work / f"decode{r}.done").exists() for r in range(DECODE_TP)):
            # Decode is done: what has not ended here within a grace period never will.
            deadline = min(deadline, time.monotonic() + DONE_GRACE)
        for name, phase in PHASES.items():
            # The router sends both legs at once: prefill gets a phase's requests when decode does.
            if phase[0].room not in senders and (work / f"phase-{name}").exists():
                senders.update({r.room: sender_class(manager, addr, r.room) for r in phase})
        for room, sender in senders.items():
            if str(room) in outcome:
                continue
            status = sender.poll()
            last_status[str(room)] = int(status)
            if status == KVPoll.WaitingForInput and room not in held:
                held[room] = _prefill_forward(rooms[room], pool, allocator, metadata, slots)
                indices, slot = held[room]
                sender.init(rooms[room].tokens, slot)
                sender.send(indices.numpy())
            elif status in (KVPoll.Success, KVPoll.Failed):
                outcome[str(room)] = "Success" if status == KVPoll.Success else "Failed"
                if status == KVPoll.Failed:
                    try:
                        sender.failure_exception()
                    except Exception as exc:
                        outcome[str(room)] += f": {exc}"
                if room in held:
                    indices, slot = held.pop(room)
                    allocator.free(indices)
                    metadata.clear_slot(slot)
                    slots.free(slot)
                sender.clear()
        time.sleep(STEP_PAUSE)
    _write(
        work / "prefill.json",
        {
            "outcome": outcome,
            "unended": {r: s for r, s in last_status.items() if r not in outcome},
            "free_tokens": allocator.available_size(),
            "free_slots": slots.available_size(),
            "pool_tokens": POOL_TOKENS,
            "slots": 2 * MAX_RUNNING,
        },
    )
    manager.teardown()
    bootstrap.close()


def _prefill_forward(
    spec: Room, pool: Any, allocator: Any, metadata: Any, slots: Any
) -> tuple[Any, int]:
    """What SGLang's prefill leaves for the sender: the room's KV in pages of its own pool
    (the :func:`kv_value` pattern) and its first token in a metadata slot (SGLang's
    ``MetadataBuffers.set_buf`` of a request)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    indices = allocator.alloc(spec.tokens)
    slot = slots.alloc()
    pos = np.arange(spec.tokens)[:, None]
    dim = np.arange(HEAD_DIM)[None, :]
    for layer in range(LAYERS):
        for kind, buffer in enumerate((pool.k_buffer, pool.v_buffer)):
            for head in range(KV_HEADS):
                values = kv_value(spec.room, layer, kind, head, pos, dim)
                buffer[layer][indices, head, :] = _tensor(values)
    req = Req(
        f"p{spec.room}",
        "",
        prompt(spec),
        SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
        bootstrap_room=spec.room,
    )
    req.metadata_buffer_index = slot
    req.output_ids.append(first_token(spec.room))
    req.cached_tokens = cached_tokens(spec.room)
    metadata.set_buf(req)
    return indices, slot


def prompt(spec: Room) -> Any:
    return array("q", range(4, 4 + spec.tokens))


def _tensor(values: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(values))


# -- decode --------------------------------------------------------------------------------------


class StreamedOutputs:
    """SGLang's output streamer, as far as the queues use it: what they hand the client."""

    def __init__(self) -> None:
        self.aborted: list[tuple[int, str]] = []

    def stream_output(self, reqs: list[Any], return_logprob: bool = False, **_: Any) -> None:
        for req in reqs:
            reason = getattr(req.finished_reason, "message", None) or str(req.finished_reason)
            self.aborted.append((int(req.bootstrap_room), str(reason)))


def scheduler_stand_in(server_args: Any, model_config: Any) -> Any:
    """The scheduler fields SGLang's decode queues read, for a rank without a model.

    Real objects where they need no model (server args, model config, speculative algorithm,
    the queues and the waiting queue); stand-ins for the model worker (``tp_worker``: no SWA,
    the KV dtype string), the running batch (empty: no decode runs here), the output streamer
    (records what would go to clients), metrics (off) and the reasoning-token counter (no
    reasoning parser).
    """
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    return SimpleNamespace(
        server_args=server_args,
        model_config=model_config,
        spec_algorithm=SpeculativeAlgorithm.NONE,
        tp_worker=SimpleNamespace(
            is_hybrid_swa=False, model_runner=SimpleNamespace(kv_cache_dtype_str="auto")
        ),
        random_seed=server_args.random_seed,
        running_batch=SimpleNamespace(reqs=[]),
        last_batch=None,
        waiting_queue=[],
        output_streamer=StreamedOutputs(),
        metrics_reporter=SimpleNamespace(enable_metrics=False),
        batch_result_processor=SimpleNamespace(
            _maybe_update_reasoning_tokens=lambda req, tok: None
        ),
        enable_priority_scheduling=False,
        enable_lora=False,
        enable_hisparse=False,
        enable_decode_hicache=False,
        enable_overlap=False,
        sliding_window_size=None,
        scheduler_stage_metrics=None,
        kv_checksum_computer=None,
        disagg_decode_prealloc_queue=None,
        disagg_decode_transfer_queue=None,
    )


class Spy:
    """Records, per room, the step at which this rank's receiver got ``init`` and
    ``send_metadata`` (the calls go through unchanged)."""

    def __init__(self) -> None:
        self.step = 0
        self.init: dict[int, int] = {}
        self.init_dp_rank: dict[int, int] = {}
        self.metadata: dict[int, int] = {}
        self.metadata_before_init: list[int] = []

    def install(self) -> None:
        from kvbridge_sglang.conn import KvbridgeKVReceiver

        spy = self
        real_init, real_send = KvbridgeKVReceiver.init, KvbridgeKVReceiver.send_metadata

        def init(receiver: Any, prefill_dp_rank: int) -> None:
            spy.init.setdefault(int(receiver.bootstrap_room), spy.step)
            spy.init_dp_rank[int(receiver.bootstrap_room)] = int(prefill_dp_rank)
            real_init(receiver, prefill_dp_rank)

        def send_metadata(receiver: Any, *args: Any, **kwargs: Any) -> None:
            room = int(receiver.bootstrap_room)
            spy.metadata.setdefault(room, spy.step)
            if room not in spy.init:
                spy.metadata_before_init.append(room)
            real_send(receiver, *args, **kwargs)

        KvbridgeKVReceiver.init = init  # type: ignore[method-assign]
        KvbridgeKVReceiver.send_metadata = send_metadata  # type: ignore[method-assign]


class HeldBootstrapAnswers:
    """Rank 1's bootstrap look-ups wait until :meth:`release` (or a deadline): the prefill's
    parallel info, hence each request's prefill DP rank, resolves later there than on rank 0."""

    def __init__(self, endpoint: Any) -> None:
        self.gate = threading.Event()
        client = endpoint._client
        answer = client.info

        def held(addr: str, *args: Any, **kwargs: Any) -> Any:
            self.gate.wait(PHASE_DEADLINE)
            return answer(addr, *args, **kwargs)

        client.info = held

    def release(self) -> None:
        self.gate.set()


def decode_main(work: Path, bootstrap_port: int, dist_port: int, rank: int) -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()  # as SGLang's scheduler process does, before anything imports get_kv_class
    from sglang.srt import runtime_context
    from sglang.srt.distributed.bootstrap import init_parallel_runtime

    server_args = _server_args(
        work / "model",
        "decode",
        DECODE_TP,
        disaggregation_decode_retraction_backup="cpu_tensor",
        num_reserved_decode_tokens=RESERVED_DECODE_TOKENS,
        dist_timeout=int(PHASE_DEADLINE),
    )
    runtime_context.publish(
        server_args,
        role="scheduler",
        ranks=runtime_context.SpawnRanks(world_rank=rank, gpu_id=rank),
    )
    # SGLang's own process groups: the gloo group of the TP ranks is what the queues reduce on.
    init_parallel_runtime(server_args=server_args, device="cpu", dist_port=dist_port)
    ready = work / "prefill.ready"
    deadline = time.monotonic() + PHASE_DEADLINE
    while not ready.exists():
        if (work / "prefill.error").exists() or time.monotonic() > deadline:
            raise RuntimeError("the prefill process failed or never became ready")
        time.sleep(0.1)
    spy = Spy()
    spy.install()
    results = {}
    for name, rooms in PHASES.items():
        if rank == 0:
            (work / f"phase-{name}").touch()
        phase = DecodePhase(name, rooms, server_args, rank, bootstrap_port, spy)
        results[name] = phase.run()
        _write(work / f"decode{rank}.json", results)
    (work / f"decode{rank}.done").touch()


class DecodePhase:
    """One rank's SGLang decode queues, built afresh, driven until every room of the phase
    ended on both ranks (or either rank's deadline passed)."""

    def __init__(
        self,
        name: str,
        rooms: tuple[Room, ...],
        server_args: Any,
        rank: int,
        bootstrap_port: int,
        spy: Spy,
    ) -> None:
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.disaggregation.decode import (
            DecodePreallocQueue,
            DecodeReqToTokenPool,
            DecodeTransferQueue,
        )
        from sglang.srt.disaggregation.utils import ReqToMetadataIdxAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        from sglang.srt.runtime_context import get_parallel

        self.name, self.rooms, self.rank, self.spy = name, rooms, rank, spy
        self.bootstrap_port = bootstrap_port
        self.group = get_parallel().attn_tp_group.cpu_group
        model_config = ModelConfig.from_server_args(server_args)
        self.pool, self.allocator = _kv_pool(model_config, DECODE_TP)
        self.req_pool = DecodeReqToTokenPool(
            size=MAX_RUNNING,
            max_context_len=model_config.context_len + 4,
            device="cpu",
            enable_memory_saver=False,
            pre_alloc_size=MAX_RUNNING,
        )
        # What SGLang builds for a decode server (its radix cache is disabled there).
        self.tree_cache = UnifiedRadixCache(
            CacheInitParams(
                disable=True,
                req_to_token_pool=self.req_pool,
                token_to_kv_pool_allocator=self.allocator,
                page_size=1,
                tree_components=(ComponentType.FULL,),
            )
        )
        slots = 2 * self.req_pool.size  # as SGLang's scheduler sizes them on decode
        self.metadata_slots = ReqToMetadataIdxAllocator(slots)
        metadata = _metadata_buffers(slots, server_args)
        self.scheduler = scheduler_stand_in(server_args, model_config)
        self.transfer = DecodeTransferQueue(
            self.metadata_slots, metadata, self.scheduler, self.tree_cache
        )
        self.prealloc = DecodePreallocQueue(
            req_to_token_pool=self.req_pool,
            token_to_kv_pool_allocator=self.allocator,
            draft_token_to_kv_pool=None,
            req_to_metadata_buffer_idx_allocator=self.metadata_slots,
            metadata_buffers=metadata,
            scheduler=self.scheduler,
            transfer_queue=self.transfer,
            tree_cache=self.tree_cache,
            gpu_id=rank,
            bootstrap_port=bootstrap_port,
            max_total_num_tokens=POOL_TOKENS,
            num_reserved_decode_tokens=RESERVED_DECODE_TOKENS,
            transfer_backend=_backend(),
        )
        self.scheduler.disagg_decode_prealloc_queue = self.prealloc
        self.scheduler.disagg_decode_transfer_queue = self.transfer
        self.manager = self.prealloc.kv_manager
        self.held = HeldBootstrapAnswers(self.manager.endpoint) if rank == 1 else None
        self.free_at_start = [
            self.allocator.available_size(),
            self.req_pool.available_size(),
            self.metadata_slots.available_size(),
        ]
        self.by_room = {r.room: r for r in rooms}
        self.waves = {w: [r for r in rooms if r.wave == w] for w in ("early", "skewed", "late")}
        self.wave_start: dict[str, int] = {"early": 0}
        self.release_at: int | None = None
        self.events: dict[int, dict[str, Any]] = {r.room: {} for r in rooms}
        self.records: list[list[list[int]]] = []
        self.kv_errors: list[str] = []

    def run(self) -> dict[str, Any]:
        from sglang.srt.disaggregation import utils as disagg_utils
        from sglang.srt.disaggregation.decode import SchedulerDisaggregationDecodeMixin

        real_reduce = disagg_utils._all_reduce_polls
        if self.name == "rank_local":
            disagg_utils._all_reduce_polls = lambda polls, group: polls
        deadline = time.monotonic() + PHASE_DEADLINE
        step = 0
        try:
            while True:
                self.spy.step = step
                self._add_requests(step)
                # One pass of SGLang's decode event loop over its disaggregation queues.
                self.prealloc.prefetch_prefill_dp_rank_queries()
                SchedulerDisaggregationDecodeMixin.process_decode_queue(self.scheduler)
                self._observe(step)
                if self._agree(step, time.monotonic() > deadline):
                    break
                step += 1
                time.sleep(STEP_PAUSE)
        finally:
            disagg_utils._all_reduce_polls = real_reduce
            if self.held is not None:
                self.held.release()
        return self._result()

    def _add_requests(self, step: int) -> None:
        """The requests SGLang's scheduler would have received (and broadcast to every TP rank)
        before this step."""
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        for wave, start in self.wave_start.items():
            k = step - start
            for spec in self.waves[wave][k * PER_STEP : (k + 1) * PER_STEP] if k >= 0 else []:
                self.events[spec.room]["added"] = step
                self.prealloc.add(
                    Req(
                        f"d{spec.room}",
                        "",
                        prompt(spec),
                        SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
                        bootstrap_host=HOST,
                        bootstrap_port=self.bootstrap_port,
                        bootstrap_room=spec.room,
                    )
                )

    def _observe(self, step: int) -> None:
        """Where each room is after the step; check and release what was transferred."""
        from sglang.srt.mem_cache.common import release_kv_cache

        in_prealloc = {int(d.req.bootstrap_room) for d in self.prealloc.queue}
        in_transfer = {int(d.req.bootstrap_room) for d in self.transfer.queue}
        deferred = {int(e[0].req.bootstrap_room) for e in self.transfer._deferred_releases}
        for room, reason in self.scheduler.output_streamer.aborted:
            self.events[room].setdefault("failed", []).append(step)
            self.events[room].setdefault("reason", reason)
        self.scheduler.output_streamer.aborted.clear()
        for req in self.scheduler.waiting_queue:
            room = int(req.bootstrap_room)
            ev = self.events[room]
            ev.setdefault("transferred", []).append(step)
            ev["output_ids"] = list(req.output_ids)
            ev["cached_tokens"] = int(req.cached_tokens)
            self.kv_errors += _check_kv(
                self.pool, self.req_pool, req, self.by_room[room], self.rank
            )
            release_kv_cache(req, self.tree_cache, checkpoint=False)  # as if decoding finished
        self.scheduler.waiting_queue.clear()
        for room, ev in self.events.items():
            if "added" not in ev:
                continue
            if room in in_transfer:
                ev.setdefault("entered_transfer", step)
            if room not in in_prealloc:
                ev.setdefault("left_prealloc", step)
            if "entered_transfer" in ev and room not in in_transfer:
                ev.setdefault("left_transfer", step)
            if "failed" in ev and "left_prealloc" in ev and room not in in_transfer | deferred:
                ev.setdefault("released", step)

    def _agree(self, step: int, late: bool) -> bool:
        """Exchange this step's queue lengths with the other rank (SGLang's loop also syncs
        every step: it broadcasts the new requests); decide from both what happens next, so
        both ranks add the same requests and stop at the same step. True: stop."""
        import torch.distributed as dist

        ended = sum(1 for ev in self.events.values() if "transferred" in ev or "released" in ev)
        mine = [
            step,
            len(self.prealloc.queue),
            len(self.transfer.queue),
            len(self.transfer._deferred_releases),
            len(self.prealloc.pending_reqs),  # rank-local by design: not compared
            len(self.spy.init.keys() & self.events.keys()),
            sum(1 for ev in self.events.values() if "added" in ev),
            ended,
            int(late),
        ]
        both: list[list[int]] = [[], []]
        dist.all_gather_object(both, mine, group=self.group)
        self.records.append(both)
        (*_, init0, added, ended0, late0), (*_, init1, _, ended1, late1) = both
        if ended0 == ended1 == len(self.rooms) or late0 or late1:
            return True
        if "skewed" not in self.wave_start and init0 and not init1:
            self.wave_start["skewed"] = step + 1  # rank 0 resolved the prefill, rank 1 not
        skewed_added = step >= self.wave_start.get("skewed", step + 1) + len(
            self.waves["skewed"]
        ) // max(1, PER_STEP)
        if self.release_at is None and skewed_added and init0 == added:
            self.release_at = step + HOLD_STEPS  # rank 0 resolved every room added so far
        if self.held is not None and self.release_at is not None and step >= self.release_at:
            self.held.release()
        if "late" not in self.wave_start and self.release_at is not None and init1 == init0:
            self.wave_start["late"] = step + 1  # both resolved
        return False

    def _result(self) -> dict[str, Any]:
        for room, ev in self.events.items():
            ev["init"] = self.spy.init.get(room)
            ev["init_dp_rank"] = self.spy.init_dp_rank.get(room)
            ev["metadata"] = self.spy.metadata.get(room)
        result = {
            "records": self.records,
            "events": {str(k): v for k, v in self.events.items()},
            "kv_errors": self.kv_errors,
            "metadata_before_init": [r for r in self.spy.metadata_before_init if r in self.by_room],
            "free_at_start": self.free_at_start,
            "free_at_end": [
                self.allocator.available_size(),
                self.req_pool.available_size(),
                self.metadata_slots.available_size(),
            ],
            "live_in_kvbridge": [
                r for r in self.by_room if not self.manager.is_abort_release_safe(r)
            ],
        }
        self.manager.teardown()
        return result


def _check_kv(pool: Any, req_pool: Any, req: Any, spec: Room, rank: int) -> list[str]:
    """The request's pages hold what prefill wrote for this rank's KV head."""
    indices = req_pool.req_to_token[req.kv.req_pool_idx][: spec.tokens].long()
    pos = np.arange(spec.tokens)[:, None]
    dim = np.arange(HEAD_DIM)[None, :]
    errors = []
    for layer in range(LAYERS):
        for kind, buffer in enumerate((pool.k_buffer, pool.v_buffer)):
            got = buffer[layer][indices, 0, :].numpy()
            want = kv_value(spec.room, layer, kind, rank, pos, dim)
            if not np.array_equal(got, want):
                bad = int((got != want).any(axis=1).sum())
                errors.append(f"room {spec.room} layer {layer} {'KV'[kind]}: {bad} tokens differ")
    return errors


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("prefill", "decode"))
    parser.add_argument("work", type=Path)
    parser.add_argument("bootstrap_port", type=int)
    parser.add_argument("dist_port", type=int, nargs="?")
    parser.add_argument("rank", type=int, nargs="?")
    args = parser.parse_args(argv)
    name = "prefill" if args.role == "prefill" else f"decode{args.rank}"
    try:
        if args.role == "prefill":
            prefill_main(args.work, args.bootstrap_port)
        else:
            decode_main(args.work, args.bootstrap_port, args.dist_port, args.rank)
    except BaseException:
        (args.work / f"{name}.error").write_text(traceback.format_exc())
        raise
    finally:
        sys.stdout.flush()
    os._exit(0)  # daemon threads of SGLang and kvbridge must not hold the process


if __name__ == "__main__":
    main(sys.argv[1:])
