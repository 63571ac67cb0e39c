"""``KvbridgeConnector``: the class vLLM instantiates (scheduler process and every worker)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvbridge_vllm.config import ConnectorConfig
from kvbridge_vllm.layouts import HEAD_MAJOR
from kvbridge_vllm.logs import route_to_vllm_log
from kvbridge_vllm.scheduler import KvbridgeMetadata, KvbridgeScheduler
from kvbridge_vllm.stats import KvbridgeStats
from kvbridge_vllm.version import check_config, check_version

if TYPE_CHECKING:
    from kvbridge.bootstrap.server import BootstrapServer
    from kvbridge_vllm.worker import KvbridgeWorker

log = logging.getLogger("kvbridge_vllm")

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # pragma: no cover - older vLLM: get_finished only
    KVConnectorTransferResults = None  # type: ignore[assignment,misc]


class KvbridgeConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P  # vLLM labels the transferred prompt tokens p2p

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        route_to_vllm_log()
        check_version()
        check_config(vllm_config, kv_cache_config)
        super().__init__(vllm_config, role, kv_cache_config)
        kv = vllm_config.kv_transfer_config
        self.kb_config = ConnectorConfig.from_extra(kv.kv_connector_extra_config)
        engine_id = str(kv.engine_id)
        self.kb_scheduler: KvbridgeScheduler | None = None
        self.kb_worker: KvbridgeWorker | None = None
        self.bootstrap: BootstrapServer | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.kb_scheduler = KvbridgeScheduler(vllm_config, self.kb_config, engine_id)
            if kv.kv_role == "kv_producer":
                self._start_bootstrap(engine_id)
        else:
            from kvbridge_vllm.worker import KvbridgeWorker

            self.kb_worker = KvbridgeWorker(vllm_config, self.kb_config, engine_id)

    def _start_bootstrap(self, engine_id: str) -> None:
        from kvbridge.bootstrap.server import BootstrapServer

        secret = self.kb_config.transfer.secret
        self.bootstrap = BootstrapServer(
            self.kb_config.bootstrap_host,
            self.kb_config.bootstrap_port,
            token=secret.bootstrap_token if secret is not None else None,
            engine_id=engine_id,  # GET /query, which vllm-router and llm-d ask at start
        ).start()
        log.info("kvbridge-vllm: bootstrap server on %s", self.bootstrap.address)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        """Head-major blocks (``LBHNC``, alias ``HND``), or None for MLA.

        vLLM's engine core asks this once, with the whole ``VllmConfig``, when it resolves the
        KV cache layout (``resolve_kv_cache_layout``), before any worker allocates: an explicit
        ``VLLM_KV_CACHE_LAYOUT`` wins, then this answer if every attention backend supports
        it (else vLLM warns and takes the backends' first choice), then the backends' choice.
        kvbridge maps unequal TP by slicing a rank's heads out of a block, which needs
        head-major blocks, and the peer's TP is not known here, so it always asks for them, as
        NixlConnector does. MLA's latent cache has one head: every layout stores it alike."""
        model = getattr(vllm_config, "model_config", None)
        if model is not None and getattr(model, "use_mla", False):
            return None
        return HEAD_MAJOR

    # -- scheduler side -------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        assert self.kb_scheduler is not None
        return self.kb_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self.kb_scheduler is not None
        self.kb_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KvbridgeMetadata:
        assert self.kb_scheduler is not None
        return self.kb_scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        assert self.kb_scheduler is not None
        self.kb_scheduler.update_connector_output(connector_output)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.kb_scheduler is not None
        return self.kb_scheduler.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self.kb_scheduler is not None and self.kb_scheduler.has_pending_push_work()

    # -- worker side ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.kb_worker is not None
        self.kb_worker.register_kv_caches(kv_caches, self._kv_cache_config)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self.kb_worker is not None
        meta = self._connector_metadata
        self.kb_worker.start_load_kv(meta if isinstance(meta, KvbridgeMetadata) else None)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # whole-request handoff: the KV landed before the request was scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kw: Any) -> None:
        return  # prefill sends the request's blocks once it finished

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.kb_worker is not None
        sending, recving, _ = self.kb_worker.transfer_results()
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        assert self.kb_worker is not None
        sending, recving, failed = self.kb_worker.transfer_results()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def get_kv_connector_stats(self) -> KvbridgeStats | None:
        if self.kb_worker is None:
            return None
        data = self.kb_worker.take_stats()
        return KvbridgeStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvbridgeStats:
        return KvbridgeStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        """kvbridge's series on vLLM's ``/metrics``: a ``KvbridgePromMetrics`` (stats.py)."""
        from kvbridge_vllm.stats import KvbridgePromMetrics

        return KvbridgePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.kb_worker is not None:
            self.kb_worker.shutdown()
        if self.bootstrap is not None:
            self.bootstrap.stop()
            self.bootstrap = None
