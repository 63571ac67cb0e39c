"""The typed facade through which the core calls exactly one configured transport.

It is also where plugin misbehaviour becomes data: an exception from a per-room hook is
logged once and turned into a local ``Failed`` for that room, which the queues then reduce like
any other local observation.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvbridge.config import TransferConfig
from kvbridge.errors import MemoryRegistrationError
from kvbridge.status import KVPoll
from kvbridge.transport.loading import LoadedTransport, TransportRegistry
from kvbridge.types import (
    Endpoint,
    MemoryRegion,
    PollResult,
    RankIdentity,
    SendChunk,
    TransportInfo,
)

log = logging.getLogger("kvbridge")

_FAILED = np.uint8(KVPoll.Failed)


class Transport:
    """One loaded transport plugin, called through its private plugin manager."""

    def __init__(self, loaded: LoadedTransport) -> None:
        self._loaded = loaded
        self._hook = loaded.plugin_manager.hook

    @classmethod
    def from_config(
        cls, config: TransferConfig, registry: TransportRegistry | None = None
    ) -> Transport:
        """Select ``config.transport`` among the installed transports."""
        registry = registry or TransportRegistry.discover()
        return cls(registry.get(config.transport))

    @property
    def name(self) -> str:
        return self._loaded.info.name

    @property
    def info(self) -> TransportInfo:
        return self._loaded.info

    def create_manager(
        self,
        config: TransferConfig,
        rank: RankIdentity,
        kv_regions: Sequence[MemoryRegion],
        aux_regions: Sequence[MemoryRegion],
    ) -> TransportManager:
        kv, aux = tuple(kv_regions), tuple(aux_regions)
        _check_regions(kv + aux)
        manager = self._hook.kvbridge_manager_create(
            config=config, rank=rank, kv_regions=kv, aux_regions=aux
        )
        if manager is None:
            raise MemoryRegistrationError(f"transport {self.name!r} returned no manager")
        return TransportManager(self, manager, rank)


def _check_regions(regions: tuple[MemoryRegion, ...]) -> None:
    ordered = sorted(regions, key=lambda r: r.addr)
    for a, b in itertools.pairwise(ordered):
        if b.addr < a.end:
            raise MemoryRegistrationError(
                f"memory regions overlap: [{a.addr:#x}, {a.end:#x}) and [{b.addr:#x}, {b.end:#x})"
            )


def direct_caller(caller: Any) -> Callable[..., Any]:
    """A transport hook's caller that takes the hook spec's arguments by position.

    A transport's plugin manager holds one plugin and every operation hook is ``firstresult``,
    so with exactly one plain implementation pluggy's answer is that function called with the
    arguments it declares: calling it so skips the argument checks, the implementation loop
    and the result list (a few microseconds a call, several calls per request and per step).
    An implementation that declares the spec's arguments in the spec's order is returned
    itself, so the call costs nothing above the plugin's own frame. Anything else (no
    implementation, a wrapper) goes through pluggy.
    """
    order = tuple(caller.spec.argnames)
    impls = caller.get_hookimpls()
    if len(impls) != 1 or impls[0].hookwrapper or getattr(impls[0], "wrapper", False):

        def through_pluggy(*args: Any) -> Any:
            return caller(**dict(zip(order, args, strict=True)))

        return through_pluggy
    function, names = impls[0].function, tuple(impls[0].argnames)
    if names == order:
        return function  # type: ignore[no-any-return]
    # pluggy refuses at registration an implementation that declares an argument the spec lacks
    picks = tuple(order.index(name) for name in names)

    def call(*args: Any) -> Any:
        return function(*[args[i] for i in picks])

    return call


class TransportManager:
    """A rank's transport state plus the core's record of rooms the plugin itself failed."""

    def __init__(self, transport: Transport, manager: Any, rank: RankIdentity) -> None:
        self.transport = transport
        self.rank = rank
        self.raw = manager
        hook = transport._hook
        self._hook = hook
        self._calls: dict[str, Callable[..., Any]] = {}
        self._receiver_poll = self._caller("kvbridge_receiver_poll")
        self._sender_poll = self._caller("kvbridge_sender_poll")
        self._plugin_failures: dict[int, str] = {}
        self._warned_no_drain = False
        self._closed = False

    def _caller(self, hook_name: str) -> Callable[..., Any]:
        call = self._calls.get(hook_name)
        if call is None:
            call = self._calls[hook_name] = direct_caller(getattr(self._hook, hook_name))
        return call

    @property
    def endpoint(self) -> Endpoint:
        return self._hook.kvbridge_manager_endpoint(manager=self.raw)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hook.kvbridge_manager_close(manager=self.raw)

    def _call_room(self, hook_name: str, room: int, *args: Any) -> None:
        if room in self._plugin_failures:
            return
        try:
            self._caller(hook_name)(self.raw, room, *args)
        except Exception as exc:
            reason = (
                f"transport {self.transport.name} {hook_name} raised {type(exc).__name__}: {exc}"
            )
            log.warning("room %d: %s", room, reason)
            self._plugin_failures[room] = reason

    def failure_of(self, room: int) -> str | None:
        """The reason the plugin failed ``room`` by raising, if it did."""
        return self._plugin_failures.get(room)

    # -- receiver ------------------------------------------------------------------------------

    def receiver_construct(self, room: int) -> None:
        self._call_room("kvbridge_receiver_construct", room)

    def receiver_init(self, room: int, peers: Sequence[Endpoint]) -> None:
        self._call_room("kvbridge_receiver_init", room, tuple(peers))

    def receiver_send_metadata(self, room: int, kv_indices: np.ndarray, aux_index: int) -> None:
        indices = np.ascontiguousarray(kv_indices, dtype=np.int64)
        self._call_room("kvbridge_receiver_send_metadata", room, indices, int(aux_index))

    def receiver_poll(self, rooms: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        return self._poll(self._receiver_poll, rooms)

    def receiver_abort(self, room: int, reason: str) -> None:
        self._call_room("kvbridge_receiver_abort", room, reason)

    def receiver_clear(self, room: int) -> None:
        self._clear("kvbridge_receiver_clear", room)

    # -- sender --------------------------------------------------------------------------------

    def sender_construct(self, room: int) -> None:
        self._call_room("kvbridge_sender_construct", room)

    def sender_init(self, room: int, peers: Sequence[Endpoint]) -> None:
        self._call_room("kvbridge_sender_init", room, tuple(peers))

    def sender_send(self, room: int, chunk: SendChunk) -> None:
        self._call_room("kvbridge_sender_send", room, chunk)

    def sender_poll(self, rooms: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        return self._poll(self._sender_poll, rooms)

    def sender_abort(self, room: int, reason: str) -> None:
        self._call_room("kvbridge_sender_abort", room, reason)

    def sender_clear(self, room: int) -> None:
        self._clear("kvbridge_sender_clear", room)

    def sender_drained(self, rooms: np.ndarray) -> np.ndarray | None:
        """Bool per aborted room: no write of it will land any more (see the hookspec); None
        when the transport cannot tell (a plugin for API 1.0: what that means for the fence
        is ``PrefillRooms.drained``'s to decide). A plugin that raises or answers nonsense
        confirms nothing."""
        rooms = np.asarray(rooms, dtype=np.uint64)
        if not len(rooms):
            return np.zeros(0, dtype=bool)
        try:
            result = self._caller("kvbridge_sender_drained")(self.raw, rooms)
        except Exception as exc:
            log.warning(
                "transport %s kvbridge_sender_drained raised %s: %s",
                self.transport.name,
                type(exc).__name__,
                exc,
            )
            return np.zeros(len(rooms), dtype=bool)
        if result is None:  # a plugin written for API 1.0 has no such hook
            if not self._warned_no_drain:
                self._warned_no_drain = True
                log.warning(
                    "transport %s predates kvbridge_sender_drained (API 1.1): aborts are "
                    "acknowledged without a guarantee that its writes have stopped",
                    self.transport.name,
                )
            return None
        drained = np.asarray(result, dtype=bool)
        if drained.shape != (len(rooms),):
            log.warning(
                "transport %s kvbridge_sender_drained returned %s entries for %d rooms",
                self.transport.name,
                drained.size,
                len(rooms),
            )
            return np.zeros(len(rooms), dtype=bool)
        return drained

    # -- shared --------------------------------------------------------------------------------

    def _clear(self, hook_name: str, room: int) -> None:
        self._plugin_failures.pop(room, None)
        try:
            self._caller(hook_name)(self.raw, room)
        except Exception:
            log.exception(
                "room %d: transport %s %s raised; ignored", room, self.transport.name, hook_name
            )

    def _poll(self, caller: Any, rooms: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """One hook call for all rooms; returns uint8 statuses and failure reasons."""
        count = len(rooms)
        if count == 0:
            return np.zeros(0, dtype=np.uint8), {}
        rooms = np.asarray(rooms, dtype=np.uint64)
        try:
            result: PollResult = caller(self.raw, rooms)
            statuses = np.asarray(result.statuses, dtype=np.uint8)
            if statuses.shape != (count,):
                raise ValueError(f"returned {statuses.size} statuses for {count} rooms")
            failures = dict(result.failures)
        except Exception as exc:
            reason = f"transport {self.transport.name} poll failed: {type(exc).__name__}: {exc}"
            log.warning(reason)
            return np.zeros(count, dtype=np.uint8), dict.fromkeys(map(int, rooms), reason)
        if self._plugin_failures:
            keys = np.fromiter(self._plugin_failures, dtype=np.uint64)
            hit = np.isin(rooms, keys)
            if hit.any():
                statuses = statuses.copy()
                statuses[hit] = _FAILED
                for room in rooms[hit]:
                    failures[int(room)] = self._plugin_failures[int(room)]
        return statuses, failures
