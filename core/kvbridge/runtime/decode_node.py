"""A decode rank's complete wiring: transport manager, control channel, bootstrap, session.

An engine creates one :class:`DecodeNode` per decode rank (a :class:`~kvbridge.runtime.
prefill_node.PrefillNode` on prefill ranks), calls ``add`` with the same requests in the same
order on every rank of its group, and calls ``step`` once per scheduler step.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from kvbridge.bootstrap.directory import BootstrapDirectory, DecodeExpectation
from kvbridge.checksum import room_checksum
from kvbridge.config import TransferConfig
from kvbridge.observe import ControlLosses, ObserverRelay
from kvbridge.protocol.decode import (
    MAX_HELD_ABORTS,
    AbortNotice,
    DecodeRequest,
    HeldAborts,
    MetadataToSend,
    PageAllocator,
    abort_notice,
)
from kvbridge.protocol.messages import (
    Abort,
    Message,
    Metadata,
    Register,
    Waiting,
    refused_by,
    regions_to_wire,
)
from kvbridge.protocol.outcomes import Aborted, DecodeStep
from kvbridge.protocol.plan import PrefillKey, PrefillTarget, by_control
from kvbridge.runtime.collective import Reducer
from kvbridge.runtime.control import ControlSender, Outbox, control_key, control_receiver
from kvbridge.runtime.decode_session import DecodeSession
from kvbridge.transport.facade import Transport
from kvbridge.transport.hookspecs import KVBRIDGE_API_VERSION
from kvbridge.types import MemoryRegion, RankIdentity, Role

log = logging.getLogger("kvbridge")


class DecodeNode:
    """A decode rank: receives KV into ``kv_regions`` and aux rows into ``aux``."""

    def __init__(
        self,
        *,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: Sequence[MemoryRegion],
        aux: np.ndarray,
        pages: PageAllocator | None,
        reducer: Reducer,
        page_size: int,
        kv_dtype: str,
        kv_layout: str = "head_sharded",
        transport: Transport | None = None,
        host: str | None = None,
        dp_follows_room: bool = False,
        observers: ObserverRelay | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.key = f"decode-{uuid.uuid4().hex[:12]}-dp{rank.dp_rank}-tp{rank.tp_rank}"
        transport = transport or Transport.from_config(config)
        self.kv_regions = tuple(kv_regions)
        self.aux_regions = (MemoryRegion.of(aux, aux.dtype.itemsize),)
        self.manager = transport.create_manager(config, rank, self.kv_regions, self.aux_regions)
        key = control_key(config)
        self._out = ControlSender(key)
        #: What a step sends, sent at its end (one frame per peer for its metadata).
        self._outbox = Outbox(self._out)
        self._registered: set[str] = set()
        #: Aborts waiting for their address's bootstrap answer (the policy is the protocol's).
        self._held: HeldAborts[Abort] = HeldAborts(config.bootstrap_timeout, MAX_HELD_ABORTS)
        self._last_used: dict[str, float] = {}
        self._next_idle_check = 0.0
        self.control = control_receiver(self._on_message, config, host, key)
        self.directory = BootstrapDirectory(
            config,
            rank.tp_rank,
            rank.tp_size,
            DecodeExpectation(
                transport=config.transport,
                kv_dtype=kv_dtype,
                kv_layout=kv_layout,
                page_size=page_size,
                page_bytes=self.kv_regions[0].item_bytes if self.kv_regions else 1,
                num_kv_regions=max(len(self.kv_regions), 1),
                api_version=KVBRIDGE_API_VERSION,
            ),
            on_lost=lambda addr, reason: self.session.fail_address(addr, reason),
            dp_follows_room=dp_follows_room,
        )
        self.session = DecodeSession(
            config=config,
            manager=self.manager,
            pages=pages,
            aux=aux,
            reducer=reducer,
            directory=self.directory,
            send_metadata=self._send_metadata,
            send_abort=self._send_abort,
            on_writer_dead=lambda key: self.directory.writer_dead(PrefillKey.parse(str(key)).addr),
            send_waiting=self._send_waiting,
            verify=self._verify if config.verify_checksums else None,
            observers=observers if observers is not None else ObserverRelay(discover=True),
            page_bytes=sum(r.item_bytes for r in self.kv_regions),
        )
        self._losses = ControlLosses(
            self.session.observers,
            rank,
            self.control,
            (self._out,),
            untrusted=lambda: self.session.untrusted,
        )

    def _on_message(self, message: Message) -> None:
        # From the receiver's drain (this node's step; its own thread when no step came for a
        # while): the session takes it up at its next step.
        if refused_by(Role.DECODE, message):
            self.session.refuse(message)
        else:
            self.session.receive(message)

    @property
    def abort_acks(self) -> int:
        """AbortAck messages this rank took up (from any sender)."""
        return self.session.abort_acks

    def _ensure_registered(self, control: str) -> None:
        """A prefill rank hears who this decode rank is before anything else from it."""
        self._last_used[control] = time.monotonic()
        if control in self._registered:
            return
        self._outbox.put(
            control,
            Register(
                self.key,
                dict(self.manager.endpoint),
                regions_to_wire(self.kv_regions),
                regions_to_wire(self.aux_regions),
                self.control.address,
            ),
        )
        self._registered.add(control)

    def _send_metadata(self, meta: MetadataToSend, target: PrefillTarget) -> None:
        for contact in target.plan:
            self._ensure_registered(contact.control)
            route = contact.route
            self._outbox.put(
                contact.control,
                Metadata(
                    meta.room,
                    self.key,
                    meta.pages,
                    meta.aux_slot,
                    contact.expected,
                    None if route is None else (route.src_offset, route.dst_offset, route.length),
                ),
            )

    def _verify(
        self,
        room: int,
        target: PrefillTarget,
        pages: np.ndarray,
        aux_slot: int,
        checksums: Mapping[object, int],
    ) -> str | None:
        for contact in target.plan:
            route = contact.route
            if route is None:
                continue  # takes part only: wrote nothing here
            got = checksums.get(contact.prefill_key)
            if got is None:
                return f"prefill {contact.prefill_key} sent no checksum (verify_checksums)"
            want = room_checksum(
                self.kv_regions, self.aux_regions, pages, aux_slot, route.dst_offset, route.length
            )
            if got != want:
                return (
                    f"checksum mismatch for the bytes from prefill {contact.prefill_key}: "
                    f"it wrote {got:#010x}, this rank holds {want:#010x}"
                )
        return None

    def _send_abort(self, notice: AbortNotice) -> None:
        message = Abort.of(notice.room, self.key, notice.cause)
        if notice.target is not None:
            controls = [contact.control for contact in notice.target.plan]
        else:  # decode gave up before it knew the room's DP rank: every prefill rank there
            controls = self.directory.controls_of(notice.bootstrap_addr)
            if not controls:
                self._hold_abort(notice.bootstrap_addr, message)
                return
        self._tell(controls, message)

    def _tell(self, controls: Sequence[str], message: Abort) -> None:
        for control in controls:
            self._ensure_registered(control)
            self._outbox.put(control, message)

    def _hold_abort(self, addr: str, message: Abort) -> None:
        if not self._held.hold(addr, message, time.monotonic()):
            log.warning(
                "room %d: %d aborts already wait for bootstrap answers; %s is not told",
                message.room,
                len(self._held),
                addr,
            )
            return
        self.directory.watch(addr)  # looked up (again) and remembered while aborts wait on it

    def _send_held_aborts(self, now: float) -> None:
        answered = {a: c for a in self._held.addresses if (c := self.directory.controls_of(a))}
        decided = self._held.release(answered, now)
        for addr, messages in decided.send:
            for message in messages:
                self._tell(answered[addr], message)
        for addr, count in decided.dropped:
            log.info(
                "%d aborts for prefill %s dropped: no bootstrap answer within "
                "bootstrap_timeout %gs",
                count,
                addr,
                self.config.bootstrap_timeout,
            )

    def _send_waiting(self, waiting: Sequence[tuple[int, PrefillTarget]]) -> None:
        for control, rooms in by_control(waiting).items():
            self._ensure_registered(control)
            self._outbox.put(control, Waiting(self.key, np.array(rooms, dtype=np.uint64)))

    def _release_replaced_writers(self) -> None:
        """A dead writer whose rank re-registered with another control address is a new
        process: the old one, and any write it had in flight, is gone (the fence may lift)."""
        for room, writer, target in self.session.dead_writers():
            self.directory.watch(target.bootstrap_addr)
            for contact in target.plan:
                if contact.prefill_key != writer:
                    continue
                now_at = self.directory.rank_control(PrefillKey.parse(contact.prefill_key))
                if now_at is not None and now_at != contact.control:
                    log.info("room %d: prefill %s was replaced; its fence lifts", room, writer)
                    self.session.writer_replaced(room, writer)

    def _forget_idle_peers(self, now: float) -> None:
        """Close sockets to prefill ranks no live room has used for ``bootstrap_timeout``."""
        in_use = {
            contact.control for target in self.session.targets.values() for contact in target.plan
        }
        idle = [
            c
            for c, t in self._last_used.items()
            if c not in in_use and now - t > self.config.bootstrap_timeout
        ]
        for control in idle:
            del self._last_used[control]
            self._registered.discard(control)
            self._out.forget(control)

    def add(self, requests: Sequence[DecodeRequest]) -> None:
        self.session.add(requests)

    def abort(self, room: int, reason: str, *, follows: bool = False) -> None:
        """Give up on ``room`` (client disconnected, request cancelled): it aborts on every
        rank at the next step, the prefill is told, and its pages are released through the
        fence (``DecodeStep.released``).

        ``follows=True``: the engine ends ``room`` on this rank only because another rank of
        its group failed it (its own consensus said so, as SGLang's MIN over ``poll()`` does).
        The room then ends here as "failed on another rank" and the prefill is told this rank
        only followed, so ``reason`` (logged at DEBUG) never passes for a root cause, and a
        root cause that arrives later is reported as a late cause (rule 7).
        """
        self.session.abort(room, reason, follows=follows)

    def abandon(
        self, room: int, bootstrap_addr: str, reason: str, *, follows: bool = False
    ) -> None:
        """The engine gave up on a request it never added here (it was still waiting for
        memory or for its prefill's parallel info): kvbridge holds nothing of it on this
        rank, but its prefill may hold the room (a router sends both legs at once), so every
        prefill rank at ``bootstrap_addr`` is told now instead of waiting out its
        ``bootstrap_timeout``. ``follows`` as in :meth:`abort`. Scheduler thread, between
        steps; the next step sends it. A room this rank did add ends through :meth:`abort`.
        """
        notice = abort_notice(Aborted(room, reason, from_other_rank=follows), None, bootstrap_addr)
        if notice is not None:
            self._send_abort(notice)

    def step(self) -> DecodeStep:
        self.control.drain()  # what peers sent since the last step, on this thread
        self._losses.check()
        now = time.monotonic()
        if now >= self._next_idle_check:
            self._next_idle_check = now + self.config.heartbeat_interval
            self._forget_idle_peers(now)
            self._release_replaced_writers()
        result = self.session.step()
        if self._held:
            self._send_held_aborts(now)
        self._outbox.flush()
        for ended in result.committed:
            self.directory.forget_room(ended.room)
        for failed in result.aborted:
            self.directory.forget_room(failed.room)
        return result

    def close(self) -> None:
        self.directory.close()
        self.control.close()
        self._out.close()
        self.manager.close()
