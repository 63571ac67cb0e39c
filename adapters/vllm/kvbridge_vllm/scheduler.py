"""The scheduler half of KvbridgeConnector: runs in vLLM's scheduler process.

It decides, per request, what each worker's kvbridge node does this step and ships that in
:class:`KvbridgeMetadata` (vLLM sends it to every worker). It never touches the protocol: the
workers' nodes do. vLLM's KVOutputAggregator moves a request only when every worker reported
it, which is the cross-rank agreement (no collective inside kvbridge).

Request flow (the params vLLM's disaggregation routers send, vllm-router and llm-d; see
adapters/vllm/README.md, "Routers"):

- prefill (``kv_producer``): the router sends ``kv_transfer_params = {"do_remote_decode": true,
  "transfer_id": T}`` with ``max_tokens=1`` (Mooncake-style routers), or without a
  ``transfer_id`` (NIXL-style routers, which relay the returned params): then T is minted
  here. When the request finishes, :meth:`request_finished` holds its blocks
  (``delay_free``), tells the workers to offer them as room ``room_of(T)`` and returns
  ``{"do_remote_prefill": true, "transfer_id": T, "remote_bootstrap_addr": ...,
  "remote_engine_id": ...}`` for the router to pass on. The blocks are freed when every worker
  reports the room finished or aborted (``finished_sending``).
- decode (``kv_consumer``): a request with ``do_remote_prefill`` (from prefill's response, or
  built by the router from the prefill's ``GET /query``; it may arrive before prefill's)
  waits for the remote KV of its whole prompt (vLLM recomputes the last prompt token): its
  newly allocated blocks go to the workers' nodes as engine-owned pages. A finished or
  failed receive is reported only when kvbridge says the pages are safe to reuse (for a
  failure: once the abort fence lifted).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvbridge_vllm.config import ConnectorConfig, normalize_addr
from kvbridge_vllm.rooms import RoomCollision, RoomTable, room_of

log = logging.getLogger("kvbridge_vllm")

try:  # vLLM's base class, so isinstance checks in vLLM pass; plain object without vLLM
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorMetadata as _MetadataBase,
    )
except ImportError:  # pragma: no cover - unit tests of rooms/config run without vLLM
    _MetadataBase = object  # type: ignore[assignment,misc]


@dataclass
class RecvRoom:
    request_id: str
    room: int
    block_ids: list[int]
    bootstrap_addr: str


@dataclass
class SendRoom:
    request_id: str
    room: int
    block_ids: list[int]


@dataclass
class KvbridgeMetadata(_MetadataBase):  # type: ignore[misc]
    """What every worker's node does this step (picklable: vLLM ships it to the workers)."""

    recv: list[RecvRoom] = field(default_factory=list)
    send: list[SendRoom] = field(default_factory=list)
    #: Decode: requests vLLM ended (client gone) while their KV was on its way. Prefill:
    #: requests that ended without offering their KV, whose decode may already wait. Abort them.
    abort: list[tuple[str, int]] = field(default_factory=list)
    #: Decode: ``(room, prefill bootstrap address)`` of requests that ended before any KV
    #: blocks were allocated for them (client gone while waiting, or computed here): the
    #: workers never had them, but their prefill may hold the room. Tell it.
    abandon: list[tuple[int, str]] = field(default_factory=list)


class KvbridgeScheduler:
    def __init__(self, vllm_config: Any, config: ConnectorConfig, engine_id: str) -> None:
        role = vllm_config.kv_transfer_config.kv_role
        self.producer = role == "kv_producer"
        self.consumer = role == "kv_consumer"
        self.config = config
        self.engine_id = engine_id
        self.rooms = RoomTable()
        self._recv: list[RecvRoom] = []
        self._send: list[SendRoom] = []
        self._abort: list[tuple[str, int]] = []
        self._abandon: list[tuple[int, str]] = []
        #: Prefill requests whose blocks wait for the transfer (finished_sending frees them).
        self.sending: set[str] = set()
        #: Decode requests waiting for remote KV.
        self.receiving: set[str] = set()
        #: Decode requests vLLM ended while receiving: their room is held until released.
        self.aborting: set[str] = set()
        self.collisions = 0
        self.bootstrap_addr = config.bootstrap_addr if self.producer else ""

    # -- decode ---------------------------------------------------------------------------------

    @staticmethod
    def _remote_prefill(request: Any) -> dict[str, Any] | None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return None
        if not params.get("transfer_id") or not params.get("remote_bootstrap_addr"):
            log.warning(
                "request %s: kv_transfer_params %s lack transfer_id or remote_bootstrap_addr; "
                "computing it locally",
                request.request_id,
                params,
            )
            return None
        return params

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        if not self.consumer:
            return 0, False
        params = self._remote_prefill(request)
        if params is None:
            return 0, False
        try:
            self.rooms.check(str(params["transfer_id"]), request.request_id)
        except RoomCollision as exc:
            log.error("%s; computing it locally", exc)
            return 0, False
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        params = self._remote_prefill(request) if self.consumer else None
        if params is None:
            return
        params["do_remote_prefill"] = False  # one transfer per request, even if re-scheduled
        if num_external_tokens <= 0:  # decode computes the prompt itself: nothing to receive
            self._abandon_room(request.request_id, params)
            return
        try:
            room = self.rooms.claim(str(params["transfer_id"]), request.request_id)
        except RoomCollision as exc:  # checked moments ago; only a racing claim gets here
            self.collisions += 1
            log.error("%s", exc)
            return
        groups = blocks.get_unhashed_block_ids_all_groups()
        block_ids = [int(b) for b in groups[0]] if groups else []
        self._recv.append(
            RecvRoom(
                request.request_id,
                room,
                block_ids,
                normalize_addr(str(params["remote_bootstrap_addr"])),
            )
        )
        self.receiving.add(request.request_id)

    # -- prefill --------------------------------------------------------------------------------

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params or {}
        if self.consumer:
            if request.request_id in self.receiving:
                # Ended while its KV was on its way (client gone): vLLM holds the blocks until
                # the workers report the receive finished, which they do once the abort fence
                # lifted. Finished requests (KV landed) get here with receiving cleared.
                room = self.rooms.room(request.request_id)
                if room is not None:
                    self._abort.append((request.request_id, room))
                    self.aborting.add(request.request_id)
            else:
                self.rooms.release(request.request_id)
                remote = self._remote_prefill(request)
                if remote is not None:  # ended while it waited for blocks: never received
                    remote["do_remote_prefill"] = False
                    self._abandon_room(request.request_id, remote)
            return False, None
        if not self.producer or not params.get("do_remote_decode"):
            return False, None
        from vllm.v1.request import RequestStatus

        transfer_id = params.get("transfer_id")
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED or not block_ids:
            # Aborted (client gone) or stopped early: nothing to hand over. A router that sends
            # both legs at once may have a decode waiting for this room already: tell it now.
            self._end_unoffered(request.request_id, transfer_id)
            return False, None
        if transfer_id is None:
            # NIXL-style routers (vllm-router --kv-connector nixl, llm-d nixlv2) send no id and
            # relay the params returned here to decode verbatim: the id is minted here.
            transfer_id = f"kvb-{uuid.uuid4().hex}"
        elif not isinstance(transfer_id, str) or not transfer_id:
            log.warning(
                "request %s: transfer_id %r is not a non-empty string; its KV is not offered",
                request.request_id,
                transfer_id,
            )
            return False, None
        try:
            room = self.rooms.claim(str(transfer_id), request.request_id)
        except RoomCollision as exc:
            self.collisions += 1
            log.error("%s; its KV is not offered", exc)
            return False, None
        self._send.append(SendRoom(request.request_id, room, [int(b) for b in block_ids]))
        self.sending.add(request.request_id)
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": transfer_id,
            "remote_bootstrap_addr": self.bootstrap_addr,
            "remote_engine_id": self.engine_id,
            "remote_room": room,
        }

    def _abandon_room(self, request_id: str, params: dict[str, Any]) -> None:
        """Decode will never receive this request's KV: its prefill, which may hold the
        room's blocks for it (routers send both legs at once), is told now instead of
        holding them until its ``bootstrap_timeout``."""
        room = room_of(str(params["transfer_id"]))
        if self.rooms.owner(room) is not None:  # a live request holds it: not ours to end
            return
        log.debug("request %s: room %d abandoned before it was received", request_id, room)
        self._abandon.append((room, normalize_addr(str(params["remote_bootstrap_addr"]))))

    def _end_unoffered(self, request_id: str, transfer_id: Any) -> None:
        if not isinstance(transfer_id, str) or not transfer_id:
            return
        room = room_of(transfer_id)
        if self.rooms.owner(room) is None:  # held by another live request: not ours to end
            self._abort.append((request_id, room))

    # -- every step -----------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> KvbridgeMetadata:
        meta = KvbridgeMetadata(self._recv, self._send, self._abort, self._abandon)
        self._recv, self._send, self._abort, self._abandon = [], [], [], []
        return meta

    def update_connector_output(self, output: Any) -> None:
        for request_id in output.finished_sending or ():
            self.sending.discard(request_id)
            self.rooms.release(request_id)
        for request_id in output.finished_recving or ():
            self.receiving.discard(request_id)
            if request_id in self.aborting:
                self.aborting.discard(request_id)
                self.rooms.release(request_id)

    def has_pending_push_work(self) -> bool:
        return bool(self.sending)
