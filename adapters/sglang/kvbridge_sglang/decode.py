"""The decode side of one SGLang rank: SGLang's receivers on one kvbridge :class:`DecodeNode`.

SGLang owns the queues, the pages and the MIN over its TP ranks; kvbridge is this rank's
protocol endpoint under it. The node runs with a :class:`SingleRankReducer` (a group of one, no
collective of kvbridge's) and engine-owned pages: kvbridge writes SGLang's pages, never
allocates or frees them, and says when an aborted request's pages are safe to reuse (the
fence), which SGLang's deferred release asks through :meth:`DecodeEndpoint.release_safe`.

Per room, what SGLang's calls do:

- the receiver is made (``Bootstrapping``) and ``init(prefill_dp_rank)`` (``WaitingForInput``):
  no I/O; the prefill's bootstrap info is fetched by :meth:`ensure_prefill_info` beforehand;
- ``send_metadata(kv_indices, aux_index)`` adds the room to the node with SGLang's pages
  (``Transferring``);
- the driver thread steps the node: a commit publishes the metadata rows, an abort its reason;
- ``poll()`` copies the committed rows into SGLang's metadata slot, then answers ``Success``
  (so SGLang's own metadata gate sees the room stamp), or ``Failed``;
- ``failure_exception()``, which SGLang calls once the MIN over its TP ranks says Failed: on a
  rank whose own room had not failed, the room is ended here too (:meth:`follow_failure`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import attrs
import numpy as np

from kvbridge import DecodeNode, DecodeRequest, KVPoll, Role, SingleRankReducer
from kvbridge.bootstrap.http_client import BootstrapClient, BootstrapError
from kvbridge_sglang.config import AdapterConfig
from kvbridge_sglang.driver import DrivenEndpoint
from kvbridge_sglang.layout import AUX_FIELD, RankLayout
from kvbridge_sglang.rooms import NO_BOOTSTRAP_HOST, RoomState, admit

log = logging.getLogger("kvbridge_sglang")
ENDED_IN_SGLANG = "request aborted in SGLang (client gone or cancelled)"
FAILED_ON_ANOTHER_RANK = (
    "failed on another decode TP rank (SGLang fails a request on every TP rank when one fails)"
)
#: Bootstrap addresses come from requests: bound the look-ups in flight and what is cached.
MAX_LOOKUPS = 16
MAX_PREFILLS = 1024


@attrs.frozen
class PrefillInfo:
    """What SGLang's decode scheduler reads from ``kv_mgr.prefill_info_table[addr]``."""

    dp_size: int
    tp_size: int
    #: The prefill DP rank is ``bootstrap_room % dp_size`` (SGLang's router convention).
    follow_bootstrap_room: bool = True


def _size(info: Any, key: str) -> int:
    """A parallel size from a bootstrap answer (untrusted: SGLang divides by it)."""
    value = info["sizes"][key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 16:
        raise ValueError(f"bootstrap answered {key} {value!r}, not a size in [1, 65536]")
    return value


class DecodeEndpoint(DrivenEndpoint):
    def __init__(self, config: AdapterConfig, layout: RankLayout) -> None:
        self.config = config
        self.rows = rows = layout.rows
        self.aux = rows.aux_layout().allocate(rows.num_slots)
        self.node = DecodeNode(
            config=config.transfer,
            aux=self.aux,
            pages=None,
            reducer=SingleRankReducer(),
            dp_follows_room=True,
            **layout.node_args(Role.DECODE),  # type: ignore[arg-type]
        )
        # A request without bootstrap_host gets this address (plugin.py): it resolves at once
        # so SGLang creates its receiver, which fails the request with the reason.
        self.prefill_info_table: dict[str, PrefillInfo] = {NO_BOOTSTRAP_HOST: PrefillInfo(1, 1)}
        self._lookups: set[str] = set()
        self._lookup_failures: dict[str, str] = {}
        self._client = BootstrapClient.from_config(config.transfer)
        self._rooms: dict[int, RoomState] = {}
        #: Rooms handed to the node and not yet committed or released: their pages are
        #: kvbridge's to write (an aborted one stays here until the fence lifts).
        self._live: set[int] = set()
        self.transfers = self.failures = self.bytes = 0
        self.page_bytes = layout.page_bytes
        super().__init__("kvbridge-sglang-decode", config.poll_interval)

    # -- SGLang's scheduler thread ------------------------------------------------------------

    def ensure_prefill_info(self, addr: str) -> bool:
        """Non-blocking: True once ``addr``'s bootstrap info is cached; starts a look-up."""
        if addr in self.prefill_info_table:
            return True
        with self._lock:
            failure = self._lookup_failures.pop(addr, None)
            if addr in self._lookups or len(self._lookups) >= MAX_LOOKUPS:
                return False  # SGLang asks again next step; clients choose these addresses
            self._lookups.add(addr)
        if failure is not None:
            log.warning("prefill bootstrap %s: %s (trying again)", addr, failure)
        done = threading.Event()
        threading.Thread(
            target=self._lookup, args=(addr, done), name="kvbridge-sglang-lookup", daemon=True
        ).start()
        # SGLang asks again only after its retry interval (1 s): a short wait here lets the
        # first request to a new prefill go on at once when the bootstrap answers quickly,
        # without stalling the scheduler for long on one that does not.
        done.wait(self.config.lookup_wait)
        return addr in self.prefill_info_table

    def _lookup(self, addr: str, done: threading.Event) -> None:
        try:
            self._fetch_prefill_info(addr)
        finally:
            with self._lock:  # whatever happened, SGLang's next call may look it up again
                self._lookups.discard(addr)
            done.set()

    def _fetch_prefill_info(self, addr: str) -> None:
        try:
            info = self._client.info(addr)
            entry = PrefillInfo(_size(info, "dp_size"), _size(info, "tp_size"))
        except (BootstrapError, KeyError, TypeError, ValueError) as exc:
            with self._lock:
                if len(self._lookup_failures) >= MAX_PREFILLS:
                    self._lookup_failures.pop(next(iter(self._lookup_failures)))
                self._lookup_failures[addr] = str(exc)
            return
        # The node's directory takes the same answer instead of fetching it again when the
        # request is added. A prefill it refuses (another dtype, layout, ...) is still cached
        # here: SGLang then makes the receivers, and they fail with the directory's reason.
        refused = self.node.directory.offer(addr, info)
        if refused is not None:
            log.debug("prefill bootstrap %s: %s", addr, refused)  # the directory logged it
        with self._lock:
            table = self.prefill_info_table
            while len(table) >= MAX_PREFILLS:  # oldest first; the sentinel stays
                del table[next(a for a in table if a != NO_BOOTSTRAP_HOST)]
            table[addr] = entry

    def open_room(self, room: Any, bootstrap_addr: str) -> RoomState:
        """A receiver was made: refuse a room that is not a 63-bit id or is live already."""
        with self._lock:
            state = admit(
                RoomState, room, bootstrap_addr, lambda r: r in self._rooms or r in self._live
            )
            if state.room:
                self._rooms[state.room] = state
        return state

    def send_metadata(self, state: RoomState, pages: np.ndarray, aux_index: int) -> None:
        if state.status == KVPoll.Failed:
            return
        request = DecodeRequest(
            state.room,
            len(pages),
            state.bootstrap_addr,
            prefill_dp_rank=state.prefill_dp_rank,
            pages=pages,
        )
        state.aux_index = int(aux_index)
        state.status = KVPoll.Transferring
        state.metadata_sent = True
        with self._lock:
            self._live.add(state.room)
        self._queue("add", request)

    def poll(self, state: RoomState) -> int:
        self.step_from_poll()
        if self.driver.error is not None and state.status not in (KVPoll.Success, KVPoll.Failed):
            state.fail(f"kvbridge step failed (in poll() or the driver): {self.driver.error!r}")
        if state.committed_row is not None:
            self.rows.unpack(state.committed_row, state.aux_index)
            state.committed_row = None
            state.status = KVPoll.Success
        return int(state.status)

    def abort(self, state: RoomState) -> None:
        if state.status in (KVPoll.Success, KVPoll.Failed):
            return
        state.fail(ENDED_IN_SGLANG)
        if state.room and state.metadata_sent:
            self._queue("abort", (state.room, ENDED_IN_SGLANG, False))
        elif state.room:  # aborted while it waited for memory: kvbridge never had it here
            self._queue("abandon", (state.room, state.bootstrap_addr, ENDED_IN_SGLANG, False))

    def follow_failure(self, state: RoomState) -> None:
        """SGLang failed the request on every TP rank (the MIN of their ``poll()`` answers)
        while this rank's own receiver had not failed: another rank's had.

        This rank ends the room in kvbridge as well, so the prefill hears it from this rank
        too and the fence lifts once no write can land here. Without it the room would stay
        live until ``waiting_timeout``, and SGLang's deferred release, which waits for every
        rank's fence, would hold the request's pages that long on every rank.
        """
        with self._lock:  # the driver thread may be publishing this room's end right now
            if state.status == KVPoll.Failed:
                return
            ended = state.status == KVPoll.Success or not state.room
            live = not ended and state.metadata_sent
            state.status = KVPoll.Failed
            state.reason = FAILED_ON_ANOTHER_RANK
            state.from_other_rank = True
            state.committed_row = None
        # follows: the root cause is another rank's, never this reason (rule 7)
        if live:
            self._queue("abort", (state.room, FAILED_ON_ANOTHER_RANK, True))
        elif not ended:  # failed before its metadata went out: the prefill may hold it
            self._queue("abandon", (state.room, state.bootstrap_addr, FAILED_ON_ANOTHER_RANK, True))

    def release_safe(self, room: int) -> bool:
        """SGLang's deferred release: may the pages of aborted ``room`` be reused now?"""
        with self._lock:
            return room not in self._live

    def clear(self, state: RoomState) -> None:
        """SGLang is done with the receiver; kvbridge keeps a fenced room until it lifts."""
        if not state.room:
            return
        with self._lock:
            if self._rooms.get(state.room) is state:
                del self._rooms[state.room]

    # -- driver thread --------------------------------------------------------------------------

    def _step(self) -> bool:
        node = self.node
        for kind, item in self._take():
            if kind == "add":
                try:
                    node.add([item])
                except ValueError as exc:  # still fenced or queued here: nothing was written
                    with self._lock:
                        self._live.discard(item.room)
                    self._ended(item.room, None, f"refused by kvbridge: {exc}", False)
            elif kind == "abandon":
                room, addr, reason, follows = item
                node.abandon(room, addr, reason, follows=follows)
            else:
                room, reason, follows = item
                node.abort(room, reason, follows=follows)
        result = node.step()
        if result.committed or result.released:
            with self._lock:
                self._live.difference_update(c.room for c in result.committed)
                self._live.difference_update(result.released)
        for c in result.committed:
            self._ended(c.room, np.array(c.aux_row[AUX_FIELD], dtype=np.uint8), None, False)
            self.transfers += 1
            self.bytes += len(c.pages) * self.page_bytes
        for a in result.aborted:
            self._ended(a.room, None, a.reason, a.from_other_rank)
            self.failures += 1
            log.warning("room %d failed on decode: %s", a.room, a.reason)
        return bool(len(node.session))

    def _ended(self, room: int, row: np.ndarray | None, reason: str | None, other: bool) -> None:
        with self._lock:
            state = self._rooms.get(room)
            if state is None or state.status in (KVPoll.Success, KVPoll.Failed):
                return
            if row is not None:
                state.committed_row = row
            else:
                state.fail(reason or "failed", from_other_rank=other)
