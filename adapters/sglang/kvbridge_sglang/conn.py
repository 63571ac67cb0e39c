"""The classes SGLang looks up for ``--disaggregation-transfer-backend kvbridge``.

Thin on purpose: each SGLang call is forwarded to this rank's endpoint
(:class:`~kvbridge_sglang.decode.DecodeEndpoint` or
:class:`~kvbridge_sglang.prefill.PrefillEndpoint`), which holds the protocol state. Imported
only inside an SGLang process (it subclasses SGLang's base classes).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from sglang.srt.disaggregation.base.conn import (
    BaseKVBootstrapServer,
    BaseKVManager,
    BaseKVReceiver,
    BaseKVSender,
    KVTransferMetric,
)

from kvbridge import KVPoll
from kvbridge.bootstrap.server import BootstrapServer
from kvbridge.errors import ConfigError
from kvbridge_sglang.config import AdapterConfig
from kvbridge_sglang.decode import DecodeEndpoint
from kvbridge_sglang.layout import MetadataRows, RankLayout, kv_layout_for, kv_regions
from kvbridge_sglang.logs import route_to_sglang_log
from kvbridge_sglang.prefill import PrefillEndpoint, SendState
from kvbridge_sglang.rooms import RoomState
from kvbridge_sglang.version import Unsupported, check_server_args, check_version

log = logging.getLogger("kvbridge_sglang")


def _mode_name(mode: Any) -> str:
    return str(getattr(mode, "value", mode))


def _device_of(server_args: Any, kv_args: Any) -> str:
    device = str(getattr(server_args, "device", "cuda") or "cuda")
    if device == "cpu":
        return "cpu"
    if device in ("cuda", "gpu"):
        return f"cuda:{int(getattr(kv_args, 'gpu_id', 0) or 0)}"
    raise Unsupported(f"kvbridge-sglang: --device {device} is not supported (cpu or cuda)")


def _advertised_host(config: AdapterConfig, server_args: Any) -> str:
    host = config.transfer.advertise_host or str(getattr(server_args, "host", "127.0.0.1"))
    if host in ("0.0.0.0", "::", ""):
        raise Unsupported(
            f"kvbridge-sglang: --host {host} listens everywhere; set KVBRIDGE_ADVERTISE_HOST to "
            f"the address routers and decode instances reach this prefill on"
        )
    return host


class KvbridgeKVManager(BaseKVManager):
    """One per scheduler rank: builds the rank's kvbridge endpoint from SGLang's KVArgs."""

    enable_deferred_decode_kv_release = True
    supports_deferred_decode_kv_release = True

    def __init__(
        self,
        args: Any,
        disaggregation_mode: Any,
        server_args: Any,
        is_mla_backend: bool | None = False,
    ) -> None:
        route_to_sglang_log()
        check_version()
        check_server_args(server_args)
        self.kv_args = args
        self.server_args = server_args
        self.mode = _mode_name(disaggregation_mode)
        try:
            self.config = AdapterConfig.from_env()
        except ConfigError as exc:
            raise Unsupported(f"kvbridge-sglang configuration: {exc}") from exc
        state_types = list(getattr(args, "state_types", None) or [])
        if state_types:
            raise Unsupported(
                f"kvbridge-sglang: models with extra KV state ({[str(s) for s in state_types]}: "
                f"Mamba, sliding-window or DSA pools) are not supported yet"
            )
        page_size = int(args.page_size)
        layout = kv_layout_for(is_mla=bool(is_mla_backend), page_size=page_size)
        regions = kv_regions(
            args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens, _device_of(server_args, args)
        )
        rows = MetadataRows.from_kv_args(args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens)
        tp_size = int(getattr(server_args, "tp_size", 1) or 1)
        layout_of_rank = RankLayout(
            tp_rank=int(args.engine_rank),
            tp_size=tp_size,
            kv_regions=tuple(regions),
            rows=rows,
            page_size=page_size,
            kv_dtype=str(getattr(args, "kv_cache_dtype_str", "") or "auto"),
            kv_layout=layout,
        )
        self.endpoint: DecodeEndpoint | PrefillEndpoint
        if self.mode == "prefill":
            port = int(server_args.disaggregation_bootstrap_port)
            addr = f"{_advertised_host(self.config, server_args)}:{port}"
            self.endpoint = PrefillEndpoint(self.config, layout_of_rank, addr)
        elif self.mode == "decode":
            self.endpoint = DecodeEndpoint(self.config, layout_of_rank)
        else:
            raise Unsupported(f"kvbridge-sglang: disaggregation mode {self.mode!r}")
        log.info(
            "kvbridge-sglang %s rank tp %d/%d: transport %s, %d KV buffers of %d-byte pages "
            "(%s), %d metadata slots of %d bytes",
            self.mode,
            int(args.engine_rank),
            tp_size,
            self.config.transfer.transport,
            len(regions),
            regions[0].item_bytes,
            layout,
            rows.num_slots,
            rows.row_bytes,
        )

    # SGLang's decode scheduler reads these.
    @property
    def prefill_info_table(self) -> dict[str, Any]:
        return self._decode().prefill_info_table

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        return self._decode().ensure_prefill_info(bootstrap_addr)

    def is_abort_release_safe(self, room: int, required_acks: int = 0) -> bool:
        return self._decode().release_safe(int(room))

    def clear_deferred_abort_state(self, room: int) -> None:
        """Nothing to do: kvbridge forgot the room when it released it."""

    def register_to_bootstrap(self) -> None:
        """Nothing to do: the rank registered with bootstrap when its node was built."""

    def _decode(self) -> DecodeEndpoint:
        if not isinstance(self.endpoint, DecodeEndpoint):
            raise RuntimeError("a decode-side call on a prefill kvbridge manager")
        return self.endpoint

    def _prefill(self) -> PrefillEndpoint:
        if not isinstance(self.endpoint, PrefillEndpoint):
            raise RuntimeError("a prefill-side call on a decode kvbridge manager")
        return self.endpoint

    def teardown(self) -> None:
        self.endpoint.close()


class KvbridgeKVSender(BaseKVSender):
    def __init__(
        self,
        mgr: KvbridgeKVManager,
        bootstrap_addr: str,
        bootstrap_room: int,
        req_has_disagg_prefill_dp_rank: bool = False,
    ) -> None:
        self.kv_mgr = mgr
        self.bootstrap_room = bootstrap_room
        self._endpoint = mgr._prefill()
        self._state: SendState = self._endpoint.open_room(bootstrap_room, bootstrap_addr)

    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        self._endpoint.init(self._state, num_kv_indices, aux_index)

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        return num_pages > 0 or last_chunk  # the aux rows ride on the last chunk

    def send(
        self,
        kv_indices: Any,
        state_indices: Any = None,
        num_kv_tokens: int | None = None,
        **_: Any,
    ) -> None:
        self._endpoint.send(self._state, np.asarray(kv_indices))

    def poll(self) -> int:
        return self._endpoint.poll(self._state)

    def poll_pp_consensus(self) -> int:
        return self.poll()

    def failure_exception(self) -> None:
        # SGLang asks only when the MIN over its TP ranks said Failed: if this rank's room had
        # not failed, another rank's had, and this rank ends its room too, as a follower.
        self._endpoint.follow_failure(self._state)
        raise self._state.exception()

    def get_transfer_metric(self) -> KVTransferMetric:
        s = self._state
        latency = s.finished_at - s.started if s.finished_at and s.started else None
        return KVTransferMetric(transfer_latency_s=latency, transfer_total_bytes=s.bytes or None)

    def mark_prefill_complete(self) -> None:
        """Only SGLang's "prefill_complete" allocation policy calls this; nothing to publish."""

    def abort(self) -> None:
        self._endpoint.abort(self._state)

    def clear(self) -> None:
        self._endpoint.clear(self._state)


class KvbridgeKVReceiver(BaseKVReceiver):
    def __init__(
        self,
        mgr: KvbridgeKVManager,
        bootstrap_addr: str,
        bootstrap_room: int | None = None,
        **_: Any,
    ) -> None:
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = bootstrap_room
        self._endpoint = mgr._decode()
        self._state: RoomState = self._endpoint.open_room(bootstrap_room, bootstrap_addr)
        self.require_staging = False
        #: How many acknowledgements SGLang's deferred release counts (kvbridge counts its own).
        self.bootstrap_infos: list[Any] = [None]

    @property
    def conclude_state(self) -> int | None:
        status = self._state.status
        return int(status) if status in (KVPoll.Failed, KVPoll.Success) else None

    @property
    def abort_notified(self) -> bool:
        """Whether prefill may still write this request's pages: then SGLang holds them until
        kvbridge releases them (the fence), instead of reusing them at once."""
        return self._state.metadata_sent

    def ensure_abort_notified(self, *, force_arm: bool = False) -> None:
        """kvbridge tells the prefill ranks itself, as part of the abort."""

    def init(self, prefill_dp_rank: int) -> None:
        self._state.prefill_dp_rank = int(prefill_dp_rank)
        if self._state.status == KVPoll.Bootstrapping:
            # No I/O here: the prefill's bootstrap info was fetched by try_ensure_parallel_info
            # and the room is resolved when its metadata is sent.
            self._state.status = KVPoll.WaitingForInput

    def send_metadata(
        self,
        kv_indices: Any,
        aux_index: int | None = None,
        state_indices: Any = None,
        decode_prefix_len: int | None = None,
        **_: Any,
    ) -> None:
        if state_indices is not None and any(s is not None for s in state_indices):
            self._state.fail("extra KV state (Mamba/SWA/DSA) is not supported by kvbridge yet")
            return
        if aux_index is None:
            self._state.fail("SGLang gave no metadata slot (aux_index) for the request")
            return
        pages = np.asarray(kv_indices, dtype=np.int64).reshape(-1)
        self._endpoint.send_metadata(self._state, pages, int(aux_index))

    def poll(self) -> int:
        return self._endpoint.poll(self._state)

    def failure_exception(self) -> None:
        # SGLang asks only when the MIN over its TP ranks said Failed: if this rank's room had
        # not failed, another rank's had, and this rank ends its room too.
        self._endpoint.follow_failure(self._state)
        raise self._state.exception()

    def abort(self) -> None:
        self._endpoint.abort(self._state)

    def clear(self) -> None:
        self._endpoint.clear(self._state)


class KvbridgeKVBootstrapServer(BaseKVBootstrapServer):
    """kvbridge's bootstrap server on the prefill's ``--disaggregation-bootstrap-port``."""

    def __init__(self, host: str, port: int, **_: Any) -> None:
        route_to_sglang_log()
        check_version()
        config = AdapterConfig.from_env().transfer
        self.server = BootstrapServer(host, int(port), token=config.bootstrap_token).start()
        log.info("kvbridge-sglang: bootstrap server on %s", self.server.address)

    def close(self) -> None:
        self.server.stop()


def deferred_release_timeout() -> float:
    """SGLang releases held pages after this many seconds even if writes may still land;
    kvbridge's fence has no such timeout (``fence_timeout`` only warns)."""
    return math.inf
