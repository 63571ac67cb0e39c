"""The worker half of KvbridgeConnector: one kvbridge node per vLLM worker (TP rank).

The node (:class:`kvbridge.node.DecodeNode` or :class:`~kvbridge.node.PrefillNode`) is built
with a :class:`~kvbridge.queue.collective.SingleRankReducer`: a group of one, no collective.
vLLM's KVOutputAggregator is the cross-rank agreement (a request moves only when every worker
reported it); kvbridge's rank mapping still pairs prefill and decode TP ranks, because each
node registers its real ``tp_rank``/``tp_size``.

The node is stepped from vLLM's own hooks (``start_load_kv`` and ``get_finished``, on the
worker's main thread, once per engine step while rooms are live) and by a driver thread
whenever no hook stepped it for ``poll_interval``: between engine steps and while the engine
is idle, so transfers progress and heartbeats flow. Why both: a decode engine busy-polls its
worker while requests wait for their KV, and that main thread holds the GIL most of the
time; a step left to another thread waited for the GIL at every hand-off (up to the
interpreter's 5 ms switch interval each), while a step inside the hook costs no hand-off at
all. One lock keeps the two from stepping at once. Pages are vLLM's blocks: kvbridge writes
into them and reports when they are safe to reuse, never frees them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import numpy as np

from kvbridge import (
    AuxLayout,
    AuxSlotPool,
    DecodeNode,
    DecodeRequest,
    MemoryRegion,
    PrefillNode,
    PrefillRequest,
    RankIdentity,
    Role,
    SingleRankReducer,
)
from kvbridge.observe import ObserverRelay
from kvbridge_vllm.config import ConnectorConfig
from kvbridge_vllm.layouts import KvDescription, PageContent, describe_kv_caches
from kvbridge_vllm.scheduler import KvbridgeMetadata
from kvbridge_vllm.stalls import StallWatch
from kvbridge_vllm.stats import NodeFigures, abort_kind, count

log = logging.getLogger("kvbridge_vllm")
ENDED_IN_VLLM = "request ended in vLLM while its KV was on its way (client gone or aborted)"
NEVER_RECEIVED = (
    "decode will not receive this request's KV (it ended in vLLM before blocks were "
    "allocated for it, or decode computed the prompt itself)"
)
NOT_OFFERED = "the prefill request ended in vLLM before its KV was ready (client gone or aborted)"
#: Reasons of rooms vLLM itself ended (here or, forwarded by its node, on the peer).
CANCELLED = (ENDED_IN_VLLM, NOT_OFFERED)


def _pop(table: dict[int, Any], key: int) -> Any:
    return table.pop(key) if key in table else None


class KvbridgeWorker:
    def __init__(self, vllm_config: Any, config: ConnectorConfig, engine_id: str) -> None:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        self.config = config
        self.vllm_config = vllm_config
        self.producer = vllm_config.kv_transfer_config.kv_role == "kv_producer"
        self.block_size = int(vllm_config.cache_config.block_size)
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.engine_id = engine_id
        self.node: DecodeNode | PrefillNode | None = None
        self._lock = threading.Lock()
        self._inbox: collections.deque[KvbridgeMetadata] = collections.deque()
        self._finished_sending: set[str] = set()
        self._finished_recving: set[str] = set()
        self._failed_recving: set[str] = set()
        self._stats: dict[str, Any] = {}  # kvbridge_vllm.stats.count's interval data
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Held by whoever steps the node: the driver thread or a vLLM hook.
        self._stepping = threading.Lock()
        self._last_step = 0.0
        #: Whether the node had rooms after its last step (then the hooks step it too).
        self._live = False
        #: Steps taken inside vLLM's hooks and by the driver thread (for the figures).
        self.hook_steps = self.driver_steps = 0
        # Driver-thread state.
        self._request_of: dict[int, str] = {}
        self._started: dict[int, float] = {}
        self._pages: dict[int, np.ndarray] = {}
        self._slot: dict[int, int] = {}
        self.page_bytes = 0
        self.error: BaseException | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def describe(self, kv_caches: dict[str, Any], kv_cache_config: Any = None) -> KvDescription:
        """The layer caches as kvbridge pages, from their strides and the group's spec."""
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        spec = groups[0].kv_cache_spec if groups else None
        model = getattr(self.vllm_config, "model_config", None)
        num_blocks = getattr(kv_cache_config, "num_blocks", None) or getattr(
            self.vllm_config.cache_config, "num_gpu_blocks", None
        )
        return describe_kv_caches(
            kv_caches,
            self.block_size,
            num_blocks=num_blocks,
            content=PageContent.of(spec, use_mla=bool(getattr(model, "use_mla", False))),
        )

    def register_kv_caches(self, kv_caches: dict[str, Any], kv_cache_config: Any = None) -> None:
        layout = self.describe(kv_caches, kv_cache_config)
        regions = list(layout.regions)
        self.page_bytes = sum(r.item_bytes for r in regions)
        first = next(iter(kv_caches.values()))
        kv_dtype = str(first.dtype).removeprefix("torch.")
        role = Role.PREFILL if self.producer else Role.DECODE
        rank = RankIdentity(role, tp_rank=self.tp_rank, tp_size=self.tp_size)
        common = dict(
            config=self.config.transfer,
            rank=rank,
            kv_regions=regions,
            reducer=SingleRankReducer(),
            page_size=self.block_size,
            kv_dtype=kv_dtype,
            kv_layout=layout.kv_layout,
            # The installed observers plus this worker's figures: the per-transfer times and
            # the control frames the node failed to send are known only inside the node.
            observers=ObserverRelay([NodeFigures(self._count)], discover=True),
        )
        if self.producer:
            self.aux = AuxLayout().allocate(self.config.aux_slots)
            self.slots = AuxSlotPool(self.aux["room"])
            self.node = PrefillNode(
                aux_regions=[MemoryRegion.of(self.aux, self.aux.dtype.itemsize)],
                bootstrap_addr=self.config.bootstrap_addr,
                **common,  # type: ignore[arg-type]
            )
        else:
            # The decode aux rows (room stamps) are kvbridge's own small array, not vLLM memory.
            self.aux = AuxLayout().allocate(self.config.aux_slots)
            self.node = DecodeNode(aux=self.aux, pages=None, **common)  # type: ignore[arg-type]
        log.info(
            "kvbridge-vllm %s worker tp %d/%d: %d KV regions, %d bytes per block, KV layout %s, "
            "transport %s",
            role.value if hasattr(role, "value") else role,
            self.tp_rank,
            self.tp_size,
            len(regions),
            self.page_bytes,
            layout.kv_layout,
            self.config.transfer.transport,
        )
        if layout.equal_tp_only and self.tp_rank == 0:
            log.warning(
                "kvbridge-vllm: this KV cache pairs only with instances of the same TP size "
                "(%s); for unequal prefill and decode TP use head-major blocks: "
                "VLLM_KV_CACHE_LAYOUT=LBHNC with an attention backend that supports it",
                layout.equal_tp_only,
            )
        self._thread = threading.Thread(target=self._run, name="kvbridge-vllm", daemon=True)
        self._thread.start()

    # -- vLLM hooks (engine thread) -------------------------------------------------------------

    def start_load_kv(self, metadata: KvbridgeMetadata | None) -> None:
        if metadata is not None and (
            metadata.recv or metadata.send or metadata.abort or metadata.abandon
        ):
            with self._lock:
                self._inbox.append(metadata)
            self._step_in_hook()  # metadata goes out in this engine step, not the driver's

    def transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        if self._live:
            self._step_in_hook()
        if self.error is not None:
            raise RuntimeError(
                "kvbridge-vllm failed stepping its node (driver thread or hook)"
            ) from self.error
        with self._lock:
            out = self._finished_sending, self._finished_recving, self._failed_recving
            self._finished_sending, self._finished_recving, self._failed_recving = (
                set(),
                set(),
                set(),
            )
        return out

    def take_stats(self) -> dict[str, Any]:
        with self._lock:
            stats, self._stats = self._stats, {}
        return stats

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self.node is not None:
            self.node.close()
            self.node = None

    # -- driver thread --------------------------------------------------------------------------

    def _run(self) -> None:
        watch = StallWatch(self.config.transfer.heartbeat_interval)
        interval = self.config.poll_interval
        try:
            self._last_step = time.monotonic()
            while not self._stop.is_set():
                self._stop.wait(interval if self._live else 0.005)
                if self._live and time.monotonic() - self._last_step < interval:
                    continue  # a hook stepped the node just now
                began = time.monotonic()
                with self._stepping:
                    previous = self._last_step  # by either thread: hook steps count too
                    self._step_locked()
                    self.driver_steps += 1
                watch.step_done(previous, began, time.monotonic())
        except BaseException as exc:  # surfaced to vLLM by the next transfer_results
            log.exception("kvbridge-vllm driver thread failed")
            self.error = exc
        finally:
            watch.close()

    def _step_in_hook(self) -> None:
        """Step the node on vLLM's thread, unless the driver thread is stepping it now (then
        that step takes the work). An error is kept for ``transfer_results`` to raise, as
        one in the driver thread is."""
        if self.error is not None or self.node is None:
            return
        if not self._stepping.acquire(blocking=False):
            return
        try:
            self._step_locked()
            self.hook_steps += 1
        except Exception as exc:
            log.exception("kvbridge-vllm step failed")
            self.error = exc
        finally:
            self._stepping.release()

    def _step_locked(self) -> None:
        self._live = self._step()
        self._last_step = time.monotonic()

    def _count(self, **values: float) -> None:
        with self._lock:
            count(self._stats, **values)

    def _step(self) -> bool:
        with self._lock:
            work = list(self._inbox)
            self._inbox.clear()
        if self.producer:
            return self._step_prefill(work)
        return self._step_decode(work)

    def _step_decode(self, work: list[KvbridgeMetadata]) -> bool:
        node = self.node
        assert isinstance(node, DecodeNode)
        done_ok: set[str] = set()
        done_failed: set[str] = set()
        for meta in work:
            for r in meta.recv:
                request = DecodeRequest(
                    r.room,
                    len(r.block_ids),
                    r.bootstrap_addr,
                    pages=np.asarray(r.block_ids, dtype=np.int64),
                )
                try:
                    node.add([request])
                except ValueError as exc:  # room still queued or fenced: nothing was written
                    log.error("request %s (room %d) refused: %s", r.request_id, r.room, exc)
                    done_failed.add(r.request_id)
                    continue
                self._request_of[r.room] = r.request_id
                self._started[r.room] = time.monotonic()
                self._pages[r.room] = request.pages  # type: ignore[assignment]
            for request_id, room in meta.abort:
                if self._request_of.get(room) == request_id:
                    node.abort(room, ENDED_IN_VLLM)
            for room, addr in meta.abandon:
                if room not in self._request_of:
                    node.abandon(room, addr, NEVER_RECEIVED)
        result = node.step()
        now = time.monotonic()
        for c in result.committed:
            request_id = _pop(self._request_of, c.room)
            if request_id is None:
                continue
            done_ok.add(request_id)
            n = len(self._pages.pop(c.room, ()))
            self._count(
                transfers=1,
                bytes=n * self.page_bytes,
                seconds=now - self._started.pop(c.room, now),
            )
        for a in result.aborted:
            log.warning(
                "room %d (request %s) failed: %s", a.room, self._request_of.get(a.room), a.reason
            )
            self._count(**{abort_kind(a.reason, CANCELLED): 1})
        for room in result.released:
            request_id = _pop(self._request_of, room)
            self._pages.pop(room, None)
            self._started.pop(room, None)
            if request_id is not None:
                done_failed.add(request_id)
        if done_ok or done_failed:
            with self._lock:
                self._finished_recving |= done_ok | done_failed
                self._failed_recving |= done_failed
        return bool(len(node.session))

    def _step_prefill(self, work: list[KvbridgeMetadata]) -> bool:
        node = self.node
        assert isinstance(node, PrefillNode)
        finished: set[str] = set()
        for meta in work:
            for s in meta.send:
                slots = self.slots.alloc(1)
                if slots is None:
                    log.error(
                        "request %s: no free aux slot (aux_slots=%d)", s.request_id, len(self.aux)
                    )
                    finished.add(s.request_id)
                    continue
                slot = int(slots[0])
                try:
                    node.add([PrefillRequest(s.room)])
                except ValueError as exc:
                    log.error("request %s (room %d) refused: %s", s.request_id, s.room, exc)
                    self.slots.free(slots)
                    finished.add(s.request_id)
                    continue
                self.aux[slot]["room"] = s.room
                self._slot[s.room] = slot
                self._request_of[s.room] = s.request_id
                self._pages[s.room] = np.asarray(s.block_ids, dtype=np.int64)
            for _, room in meta.abort:
                if room not in self._request_of:  # never offered here: end it for decode
                    node.abort(room, NOT_OFFERED)
        result = node.step()
        now = time.monotonic()
        for room in result.ready:
            pages = self._pages[room]
            self._started[room] = now
            posted = time.perf_counter()
            # Decode may ask for the last blocks only (its own prefix-cache hit).
            sent = node.send_prompt(
                room, pages, total=len(pages), is_last=True, aux_slot=self._slot[room]
            )
            if sent >= 0:
                self._count(bytes=sent * self.page_bytes, post_seconds=time.perf_counter() - posted)
        ended: list[tuple[int, str | None]] = [(room, None) for room in result.finished]
        ended += [(a.room, a.reason) for a in result.aborted]
        for room, failure in ended:
            request_id = _pop(self._request_of, room)
            self._pages.pop(room, None)
            slot = _pop(self._slot, room)
            if slot is not None:
                self.slots.free_one(slot)
            started = self._started.pop(room, None)
            if failure is None:
                self._count(transfers=1, seconds=now - started if started else 0.0)
            else:
                self._count(**{abort_kind(failure, CANCELLED): 1})
            if request_id is not None:
                finished.add(request_id)
        for a in result.aborted:
            log.warning("room %d failed on prefill: %s", a.room, a.reason)
        if finished:
            with self._lock:
                self._finished_sending |= finished
        return bool(len(node.session))
