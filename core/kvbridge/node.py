"""One rank's complete kvbridge wiring: transport manager, control channel, bootstrap, session.

An engine creates one node per rank (a :class:`PrefillNode` on prefill ranks, a
:class:`DecodeNode` on decode ranks), calls ``add`` with the same requests in the same order on
every rank of its group, and calls ``step`` once per scheduler step.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from kvbridge.bootstrap.client import BootstrapClient, BootstrapDirectory, DecodeExpectation
from kvbridge.checksum import room_checksum
from kvbridge.config import TransferConfig
from kvbridge.control.channel import ControlReceiver, ControlSender
from kvbridge.hookspecs import KVBRIDGE_API_VERSION
from kvbridge.observe import ControlLosses
from kvbridge.plugins import ObserverRelay
from kvbridge.protocol.decode import FROM_OTHER_RANK, DecodeRequest, MetadataToSend, PageAllocator
from kvbridge.protocol.mapping import AUTHORITATIVE_CP_RANK
from kvbridge.protocol.messages import (
    Abort,
    AbortAck,
    Heartbeat,
    Message,
    Metadata,
    Register,
    Status,
    Waiting,
)
from kvbridge.protocol.outcomes import DecodeStep, PrefillStep
from kvbridge.protocol.prefill import PrefillRequest
from kvbridge.queue.collective import Reducer
from kvbridge.queue.session import (
    DecodeMetadata,
    DecodePeer,
    DecodeSession,
    PrefillSession,
    PrefillTarget,
)
from kvbridge.ratelimit import ThrottledWarning
from kvbridge.transports import Transport
from kvbridge.types import MemoryRegion, RankIdentity

log = logging.getLogger("kvbridge")


def _regions_wire(regions: Sequence[MemoryRegion]) -> tuple[tuple[int, int, int, str], ...]:
    return tuple((r.addr, r.length, r.item_bytes, r.device) for r in regions)


def _regions_from_wire(wire: Sequence[tuple[int, int, int, str]]) -> tuple[MemoryRegion, ...]:
    return tuple(MemoryRegion(a, n, i, d) for a, n, i, d in wire)


def _control_receiver(
    on_message: Callable[[Message], None],
    config: TransferConfig,
    host: str | None,
    key: bytes | None,
) -> ControlReceiver:
    """Bind ``host`` (default ``config.bind_host``); advertise ``config.advertise_host``, else
    the bound host."""
    bind = config.bind_host if host is None else host
    advertise = config.advertise_host or bind
    return ControlReceiver(on_message, bind, key=key, advertise=advertise)


def _dp_tp_of(prefill_key: str) -> tuple[int, int]:
    """``host:port/dp<d>/tp<t>`` -> (d, t)."""
    dp, tp = prefill_key.rsplit("/", 2)[1:]
    return int(dp[2:]), int(tp[2:])


def _control_key(config: TransferConfig) -> bytes | None:
    return config.secret.derive("control") if config.secret is not None else None


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
        self.key = f"{bootstrap_addr}/dp{rank.dp_rank}/tp{rank.tp_rank}"
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
        )
        key = _control_key(config)
        self._out = ControlSender(key)  # scheduler thread only
        self._acks = ControlSender(key)  # control thread only (ZMQ sockets are single-threaded)
        self._warn_misdirected = ThrottledWarning(log, "misdirected control messages ignored")
        self.control = _control_receiver(self._on_message, config, host, key)
        self._next_heartbeat = 0.0
        self._losses = ControlLosses(
            self.session.observers,
            rank,
            self.control,
            (self._out, self._acks),
            untrusted=lambda: self.session.untrusted,
        )
        # Kept registration: sent again by the client's upkeep thread if bootstrap restarts.
        self.client = BootstrapClient.from_config(config)
        self.client.register_rank(
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
            keep=True,
        )

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Register):
            self.session.register_decode_peer(
                message.decode_key,
                DecodePeer(
                    message.endpoint,
                    _regions_from_wire(message.kv_regions),
                    _regions_from_wire(message.aux_regions),
                    message.control,
                ),
            )
        elif isinstance(message, Metadata):
            self.session.on_metadata(
                DecodeMetadata(
                    message.room,
                    message.decode_key,
                    message.pages,
                    message.aux_slot,
                    message.expected,
                    page_slice=message.route,
                    writes=message.route is not None,
                )
            )
        elif isinstance(message, Waiting):
            self.session.on_waiting(message.decode_key, message.rooms)
        elif isinstance(message, Abort):
            # Acknowledged from the scheduler thread once the transport has drained the room.
            self.session.on_decode_abort(
                message.room, message.reason if message.root else None, message.sender_key
            )
        else:
            self.session.untrusted += 1
            self._warn_misdirected(
                time.monotonic(),
                "ignored a %s control message on a prefill rank",
                type(message).__name__,
            )

    def _notify(self, room: int, peers: Sequence[DecodePeer], ok: bool, reason: str | None) -> None:
        if not ok:
            # The root cause travels with where it was seen; a follower says only that.
            root = reason is not None
            reason = f"prefill {self.key}: {reason}" if root else FROM_OTHER_RANK
        else:
            root = True
        for peer in peers:
            self._out.send(peer.control, Status(room, self.key, ok, reason, root=root))

    def _notify_checksum(self, room: int, peer: DecodePeer, checksum: int) -> None:
        self._out.send(peer.control, Status(room, self.key, True, None, checksum))

    def _acknowledge(self, room: int, peers: Sequence[DecodePeer]) -> None:
        for peer in peers:
            self._out.send(peer.control, AbortAck(room, self.key))

    def add(self, requests: Sequence[PrefillRequest]) -> None:
        self.session.add(requests)

    def publish_dp_ranks(self, dp_ranks: Mapping[int, int]) -> None:
        """Tell bootstrap which DP replica serves which rooms (the router's choice).

        Non-blocking: sent (and retried) by the bootstrap client's background thread."""
        self.client.publish_rooms(self.bootstrap_addr, dp_ranks)

    def abort(self, room: int, reason: str) -> None:
        """Give up on ``room`` from the engine's side (see ``DecodeNode.abort``)."""
        self.session.abort(room, reason)

    def requested_pages(self, room: int) -> int | None:
        """Pages decode allocated for a ready room (its prefix-cache hits excluded)."""
        return self.session.requested_pages(room)

    def step(self) -> PrefillStep:
        self._losses.check()
        now = time.monotonic()
        if now >= self._next_heartbeat:
            # From the scheduler thread on purpose: a stalled scheduler is a stalled rank.
            self._next_heartbeat = now + self.config.heartbeat_interval
            for control in self.session.live_decode_controls():
                self._out.send(control, Heartbeat(self.key))
        return self.session.step()

    def send(self, room: int, pages: np.ndarray, *, is_last: bool, aux_slot: int = -1) -> None:
        self.session.send(room, pages, is_last=is_last, aux_slot=aux_slot)

    def close(self) -> None:
        self.client.close()
        self.control.close()
        self._out.close()
        self._acks.close()
        if self.manager is not None:
            self.manager.close()


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
        self.abort_acks = 0
        key = _control_key(config)
        self._out = ControlSender(key)
        self._warn_misdirected = ThrottledWarning(log, "misdirected control messages ignored")
        self._registered: set[str] = set()
        self._last_used: dict[str, float] = {}
        self._next_idle_check = 0.0
        self.control = _control_receiver(self._on_message, config, host, key)
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
            send_early_abort=self._send_early_abort,
            on_writer_dead=lambda key: self.directory.writer_dead(str(key).rsplit("/", 2)[0]),
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
        if isinstance(message, Status):
            self.session.notify_done(
                message.room,
                message.prefill_key,
                message.ok,
                message.reason,
                message.checksum,
                message.root,
            )
        elif isinstance(message, AbortAck):
            self.abort_acks += 1
            self.session.notify_ack(message.room, message.prefill_key)
        elif isinstance(message, Heartbeat):
            self.session.notify_heartbeat(message.prefill_key)
        else:  # Register / Metadata / Abort are prefill's to receive
            self.session.queue.untrusted += 1
            self._warn_misdirected(
                time.monotonic(),
                "ignored a %s control message on a decode rank",
                type(message).__name__,
            )

    def _ensure_registered(self, control: str) -> None:
        """A prefill rank hears who this decode rank is before anything else from it."""
        self._last_used[control] = time.monotonic()
        if control in self._registered:
            return
        self._out.send(
            control,
            Register(
                self.key,
                dict(self.manager.endpoint),
                _regions_wire(self.kv_regions),
                _regions_wire(self.aux_regions),
                self.control.address,
            ),
        )
        self._registered.add(control)

    def _send_metadata(self, meta: MetadataToSend, target: PrefillTarget) -> None:
        for contact in target.plan:
            self._ensure_registered(contact.control)
            route = contact.route
            self._out.send(
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

    def _send_abort(self, room: int, target: PrefillTarget | None, reason: str | None) -> None:
        self.directory.forget_room(room)
        if target is None:
            return
        message = self._abort_message(room, reason)
        for contact in target.plan:
            self._ensure_registered(contact.control)
            self._out.send(contact.control, message)

    def _abort_message(self, room: int, reason: str | None) -> Abort:
        if reason is None:
            return Abort(room, self.key, FROM_OTHER_RANK, root=False)
        return Abort(room, self.key, f"decode {self.key}: {reason}")

    def _send_early_abort(self, room: int, bootstrap_addr: str, reason: str | None) -> None:
        """Decode gave up before it knew the room's DP rank: tell every prefill rank there."""
        message = self._abort_message(room, reason)
        for control in self.directory.controls_of(bootstrap_addr):
            self._ensure_registered(control)
            self._out.send(control, message)

    def _send_waiting(self, waiting: Sequence[tuple[int, PrefillTarget]]) -> None:
        by_control: dict[str, list[int]] = {}
        for room, target in waiting:
            for contact in target.plan:
                by_control.setdefault(contact.control, []).append(room)
        for control, rooms in by_control.items():
            self._ensure_registered(control)
            self._out.send(control, Waiting(self.key, np.array(rooms, dtype=np.uint64)))

    def _release_replaced_writers(self) -> None:
        """A dead writer whose rank re-registered with another control address is a new
        process: the old one, and any write it had in flight, is gone (the fence may lift)."""
        for room, writer, target in self.session.dead_writers():
            self.directory.watch(target.bootstrap_addr)
            for contact in target.plan:
                if contact.prefill_key != writer:
                    continue
                dp, tp = _dp_tp_of(contact.prefill_key)
                now_at = self.directory.rank_control(target.bootstrap_addr, dp, tp)
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

    def abort(self, room: int, reason: str) -> None:
        """Give up on ``room`` (client disconnected, request cancelled): it aborts on every
        rank at the next step, the prefill is told, and its pages are released through the
        fence (``DecodeStep.released``)."""
        self.session.abort(room, reason)

    def step(self) -> DecodeStep:
        self._losses.check()
        now = time.monotonic()
        if now >= self._next_idle_check:
            self._next_idle_check = now + self.config.heartbeat_interval
            self._forget_idle_peers(now)
            self._release_replaced_writers()
        result = self.session.step()
        for done in result.committed:
            self.directory.forget_room(done.room)
        return result

    def close(self) -> None:
        self.directory.close()
        self.control.close()
        self._out.close()
        self.manager.close()
