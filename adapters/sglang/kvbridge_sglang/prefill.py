"""The prefill side of one SGLang rank: SGLang's senders on one kvbridge :class:`PrefillNode`.

Per room, what SGLang's calls do:

- the sender is made: the room is added to the node (``Bootstrapping``);
- the driver thread steps the node; once decode's metadata arrived from every decode rank this
  rank writes, the room is ready (``WaitingForInput``) and SGLang calls ``init(num_pages,
  aux_index)`` and runs the forward pass;
- ``send(page_indices)`` per chunk: the chunk is queued for the driver, which hands kvbridge
  the pages decode asked for (decode skips its own prefix-cache hits: it asks for the last
  pages only). The chunk that completes ``num_pages`` is the last: SGLang's metadata rows of
  ``aux_index`` are packed into a kvbridge aux row first, and ride on it (``Transferring``);
- kvbridge reports the room finished (every decode rank has it) -> ``Success``, or aborted ->
  ``Failed`` with the root cause and where it was seen.

A zero-page last chunk is still sent (``should_send_kv_chunk``): the aux row rides on it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from kvbridge import (
    AuxSlotPool,
    KVPoll,
    MemoryRegion,
    PrefillNode,
    PrefillRequest,
    Role,
    SingleRankReducer,
)
from kvbridge_sglang.config import AdapterConfig
from kvbridge_sglang.driver import DrivenEndpoint
from kvbridge_sglang.layout import AUX_FIELD, RankLayout
from kvbridge_sglang.rooms import RoomState, admit

log = logging.getLogger("kvbridge_sglang")
ENDED_IN_SGLANG = "request aborted in SGLang on prefill (client gone or cancelled)"
FAILED_ON_ANOTHER_RANK = (
    "failed on another prefill TP rank (SGLang fails a request on every TP rank when one fails)"
)


class SendState(RoomState):
    """A sender's room: what has been sent so far, and the kvbridge aux slot of its rows."""

    def __init__(self, room: int, bootstrap_addr: str) -> None:
        super().__init__(room, bootstrap_addr)
        self.total_pages: int | None = None
        self.queued_pages = 0
        self.slot = -1
        self.started = 0.0
        self.finished_at = 0.0
        self.bytes = 0


class PrefillEndpoint(DrivenEndpoint):
    def __init__(self, config: AdapterConfig, layout: RankLayout, bootstrap_addr: str) -> None:
        self.config = config
        self.rows = rows = layout.rows
        self.aux = rows.aux_layout().allocate(rows.num_slots)
        self.slots = AuxSlotPool(self.aux["room"])
        self.page_bytes = layout.page_bytes
        self.node = PrefillNode(
            config=config.transfer,
            aux_regions=[MemoryRegion.of(self.aux, self.aux.dtype.itemsize)],
            reducer=SingleRankReducer(),
            bootstrap_addr=bootstrap_addr,
            **layout.node_args(Role.PREFILL),  # type: ignore[arg-type]
        )
        self._rooms: dict[int, SendState] = {}
        self.transfers = self.failures = 0
        super().__init__("kvbridge-sglang-prefill", config.poll_interval)

    # -- SGLang's scheduler thread ------------------------------------------------------------

    def open_room(self, room: Any, bootstrap_addr: str) -> SendState:
        with self._lock:
            state = admit(SendState, room, bootstrap_addr, lambda r: r in self._rooms)
            if state.room:
                self._rooms[state.room] = state
        if state.room:
            self._queue("add", state.room)
        return state

    def init(self, state: SendState, num_pages: int, aux_index: int | None) -> None:
        state.total_pages = int(num_pages)
        state.aux_index = -1 if aux_index is None else int(aux_index)

    def send(self, state: SendState, page_indices: np.ndarray) -> None:
        if state.status in (KVPoll.Failed, KVPoll.Success) or state.total_pages is None:
            if state.total_pages is None and state.status != KVPoll.Failed:
                self.abort(state, "SGLang sent KV before init(): not a valid sender lifecycle")
            return
        pages = np.asarray(page_indices, dtype=np.int64).reshape(-1)
        start = state.queued_pages
        state.queued_pages += len(pages)
        is_last = state.queued_pages >= state.total_pages
        slot = -1
        if is_last:
            with self._lock:  # the driver thread frees slots
                slots = self.slots.alloc(1)
            if slots is None:
                self.abort(state, f"no free kvbridge aux slot ({len(self.aux)} slots)")
                return
            slot = int(slots[0])
            self.rows.pack(state.aux_index, self.aux[AUX_FIELD][slot])
            self.aux["room"][slot] = state.room
            state.slot = slot
            state.status = KVPoll.Transferring
        if not state.started:
            state.started = time.monotonic()
        self._queue("send", (state.room, start, pages, is_last, slot, state))

    def poll(self, state: SendState) -> int:
        self.step_from_poll()
        if self.driver.error is not None and state.status not in (KVPoll.Success, KVPoll.Failed):
            state.fail(f"kvbridge step failed (in poll() or the driver): {self.driver.error!r}")
        return int(state.status)

    def abort(self, state: SendState, reason: str = ENDED_IN_SGLANG) -> None:
        if state.status in (KVPoll.Success, KVPoll.Failed):
            return
        state.fail(reason)
        if state.room:
            self._queue("abort", (state.room, reason, False))

    def follow_failure(self, state: SendState) -> None:
        """SGLang failed the request on every prefill TP rank (the MIN of their ``poll()``
        answers) while this rank's own sender had not failed: another rank's had.

        This rank ends the room in kvbridge too, as a follower: its decode peers hear "failed
        on another rank" from it (not a reason of its own passing for the root cause), and
        they stop waiting for its writes now instead of at ``waiting_timeout``.
        """
        with self._lock:  # the driver thread may be publishing this room's end right now
            if state.status in (KVPoll.Success, KVPoll.Failed):
                return
            state.fail(FAILED_ON_ANOTHER_RANK, from_other_rank=True)
        if state.room:
            self._queue("abort", (state.room, FAILED_ON_ANOTHER_RANK, True))

    def clear(self, state: SendState) -> None:
        if not state.room:
            return
        # A room failed in SGLang only stays until kvbridge ends it (its abort is queued):
        # its aux slot is freed when the node reports it.
        with self._lock:
            if self._rooms.get(state.room) is state and state.status == KVPoll.Success:
                del self._rooms[state.room]

    # -- driver thread --------------------------------------------------------------------------

    def _step(self) -> bool:
        node = self.node
        for kind, item in self._take():
            if kind == "add":
                node.add([PrefillRequest(item)])
            elif kind == "abort":
                room, reason, follows = item
                node.abort(room, reason, follows=follows)
            else:
                self._send(*item)
        result = node.step()
        for room in result.ready:
            with self._lock:
                state = self._rooms.get(room)
            if state is not None and state.status == KVPoll.Bootstrapping:
                state.status = KVPoll.WaitingForInput
        for room in result.finished:
            self._ended(room, None)
            self.transfers += 1
        for a in result.aborted:
            self._ended(room=a.room, reason=a.reason, other=a.from_other_rank)
            self.failures += 1
            log.warning("room %d failed on prefill: %s", a.room, a.reason)
        return bool(len(node.session))

    def _send(
        self, room: int, start: int, pages: np.ndarray, is_last: bool, slot: int, state: SendState
    ) -> None:
        # Decode may ask for the last pages only (its own prefix-cache hit): kvbridge skips
        # the ones it holds, chunk by chunk.
        sent = self.node.send_prompt(
            room, pages, total=state.total_pages or 0, start=start, is_last=is_last, aux_slot=slot
        )
        if sent > 0:
            state.bytes += sent * self.page_bytes

    def _ended(self, room: int, reason: str | None, other: bool = False) -> None:
        with self._lock:
            state = self._rooms.get(room)
            if state is None:
                return
            if state.slot >= 0:
                self.slots.free_one(state.slot)
                state.slot = -1
            state.finished_at = time.monotonic()
            if reason is None:
                if state.status != KVPoll.Failed:
                    state.status = KVPoll.Success
            else:
                state.fail(reason, from_other_rank=other)
            if state.status == KVPoll.Failed:
                del self._rooms[room]  # kvbridge is done with it; SGLang clears its object
