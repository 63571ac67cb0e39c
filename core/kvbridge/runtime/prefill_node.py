"""A prefill rank's complete wiring: transport manager, control channel, bootstrap, session.

An engine creates one :class:`PrefillNode` per prefill rank (a :class:`~kvbridge.runtime.
decode_node.DecodeNode` on decode ranks), calls ``add`` with the same requests in the same order
on every rank of its group, and calls ``step`` once per scheduler step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from kvbridge.bootstrap.registration import PrefillRegistration
from kvbridge.config import TransferConfig
from kvbridge.observe import ControlLosses, ObserverRelay
from kvbridge.protocol.mapping import AUTHORITATIVE_CP_RANK
from kvbridge.protocol.messages import AbortAck, Heartbeat, Message, Status, refused_by
from kvbridge.protocol.outcomes import PrefillStep
from kvbridge.protocol.plan import DecodePeer, PrefillKey, pages_decode_needs
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.runtime.collective import Reducer
from kvbridge.runtime.control import ControlSender, Outbox, control_key, control_receiver
from kvbridge.runtime.prefill_session import PrefillSession
from kvbridge.transport.facade import Transport
from kvbridge.transport.hookspecs import KVBRIDGE_API_VERSION
from kvbridge.types import MemoryRegion, RankIdentity, Role

log = logging.getLogger("kvbridge")


class PrefillNode:
    """A prefill rank. CP ranks other than the authoritative one create no transport manager."""

    def __init__(
        self,
        *,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: Sequence[MemoryRegion],
        aux_regions: Sequence[MemoryRegion],
        reducer: Reducer,
        bootstrap_addr: str,
        page_size: int,
        kv_dtype: str,
        kv_layout: str = "head_sharded",
        transport: Transport | None = None,
        host: str | None = None,
        observers: ObserverRelay | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.bootstrap_addr = bootstrap_addr
        self.key = str(PrefillKey(bootstrap_addr, rank.dp_rank, rank.tp_rank))
        authoritative = rank.cp_rank == AUTHORITATIVE_CP_RANK
        transport = transport or Transport.from_config(config)
        self.manager = (
            transport.create_manager(config, rank, kv_regions, aux_regions)
            if authoritative
            else None
        )
        self.session = PrefillSession(
            config=config,
            manager=self.manager,
            kv_regions=kv_regions,
            aux_regions=aux_regions,
            reducer=reducer,
            notify_decode=self._notify,
            acknowledge=self._acknowledge,
            notify_checksum=self._notify_checksum,
            observers=observers if observers is not None else ObserverRelay(discover=True),
            origin=rank.label,
        )
        key = control_key(config)
        self._out = ControlSender(key)  # scheduler thread only
        #: What a call sends, sent at its end (one frame per decode rank for its statuses).
        self._outbox = Outbox(self._out)
        self.control = control_receiver(self._on_message, config, host, key)
        self._next_heartbeat = 0.0
        self._losses = ControlLosses(
            self.session.observers,
            rank,
            self.control,
            (self._out,),
            untrusted=lambda: self.session.untrusted,
        )
        # Kept: sent again by the registration's upkeep thread if bootstrap restarts.
        self.registration = PrefillRegistration.from_config(config)
        self.registration.register(
            bootstrap_addr,
            {
                "dp_rank": rank.dp_rank,
                "dp_size": rank.dp_size,
                "pp_rank": rank.pp_rank,
                "pp_size": rank.pp_size,
                "cp_rank": rank.cp_rank,
                "cp_size": rank.cp_size,
                "tp_rank": rank.tp_rank,
                "tp_size": rank.tp_size,
                "control": self.control.address,
                "endpoint": dict(self.manager.endpoint) if self.manager else {},
                "page_bytes": kv_regions[0].item_bytes if kv_regions else 1,
                "page_size": page_size,
                "kv_dtype": kv_dtype,
                "kv_layout": kv_layout,
                "api_version": KVBRIDGE_API_VERSION,
                "transport": config.transport,
                "num_kv_regions": max(len(kv_regions), 1),
            },
        )

    def _on_message(self, message: Message) -> None:
        # From the receiver's drain (this node's step; its own thread when no step came for a
        # while): the session takes it up at its next step.
        if refused_by(Role.PREFILL, message):
            self.session.refuse(message)
        else:
            self.session.receive(message)

    def _notify(self, room: int, peers: Sequence[DecodePeer], ok: bool, reason: str | None) -> None:
        message = Status(room, self.key, True) if ok else Status.failed(room, self.key, reason)
        for peer in peers:
            self._outbox.put(peer.control, message)

    def _notify_checksum(self, room: int, peer: DecodePeer, checksum: int) -> None:
        self._outbox.put(peer.control, Status(room, self.key, True, None, checksum))

    def _acknowledge(self, room: int, peers: Sequence[DecodePeer]) -> None:
        for peer in peers:
            self._outbox.put(peer.control, AbortAck(room, self.key))

    def add(self, requests: Sequence[PrefillRequest]) -> None:
        self.session.add(requests)
        self._outbox.flush()  # answers to decode messages that came before the room

    def publish_dp_ranks(self, dp_ranks: Mapping[int, int]) -> None:
        """Tell bootstrap which DP replica serves which rooms (the router's choice).

        Non-blocking: sent (and retried) by the registration's background thread."""
        self.registration.publish_rooms(self.bootstrap_addr, dp_ranks)

    def abort(self, room: int, reason: str, *, follows: bool = False) -> None:
        """Give up on ``room`` from the engine's side (see ``DecodeNode.abort``, also for
        ``follows``)."""
        self.session.abort(room, reason, follows=follows)
        self._outbox.flush()

    def requested_pages(self, room: int) -> int | None:
        """Pages decode allocated for a ready room (its prefix-cache hits excluded)."""
        return self.session.requested_pages(room)

    def step(self) -> PrefillStep:
        self.control.drain()  # what peers sent since the last step, on this thread
        self._losses.check()
        now = time.monotonic()
        if now >= self._next_heartbeat:
            # From the scheduler thread on purpose: a stalled scheduler is a stalled rank.
            self._next_heartbeat = now + self.config.heartbeat_interval
            for control in self.session.live_decode_controls():
                self._out.send(control, Heartbeat(self.key))
        result = self.session.step()
        self._outbox.flush()
        return result

    def send(self, room: int, pages: np.ndarray, *, is_last: bool, aux_slot: int = -1) -> None:
        self.session.send(room, pages, is_last=is_last, aux_slot=aux_slot)

    def send_prompt(
        self,
        room: int,
        pages: np.ndarray,
        *,
        total: int,
        start: int = 0,
        is_last: bool,
        aux_slot: int = -1,
    ) -> int:
        """:meth:`send` for an engine that holds the whole prompt: ``pages`` are the prompt's
        pages ``[start, start + len(pages))`` of ``total``. Pages decode already holds (its
        own prefix-cache hit: :meth:`requested_pages` fewer than ``total``) are not sent; if
        decode asked for more pages than the prompt has, the room aborts with the reason.
        Returns how many pages went (-1: aborted)."""
        pages = np.asarray(pages, dtype=np.int64)
        keep = pages_decode_needs(pages, start, total, self.session.requested_pages(room))
        if isinstance(keep, str):
            self.abort(room, keep)
            return -1
        if len(keep) or is_last:  # a zero-page last chunk still carries the aux row
            self.send(room, keep, is_last=is_last, aux_slot=aux_slot)
        return len(keep)

    def close(self) -> None:
        self.registration.close()
        self.control.close()
        self._out.close()
        if self.manager is not None:
            self.manager.close()
