"""Every operation hook of the contract, delegating to a :class:`~kvbridge.transport.kit.manager.
BookedManager`: a plugin module exposes one :class:`ManagerHooks` instance."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvbridge.status import KVPoll
from kvbridge.transport.hookspecs import KVBRIDGE_API_VERSION, hookimpl
from kvbridge.transport.kit.manager import BookedManager
from kvbridge.types import PollResult, SendChunk

log = logging.getLogger("kvbridge")


#: The plugin API of a plugin whose ``ManagerHooks`` states no ``api_version``: the class took
#: no such keyword only while the plugin API was 1.0.
UNSTATED_API_VERSION = "1.0"


class ManagerHooks:
    """Every operation hook of the contract, delegating to a :class:`BookedManager`.

    A plugin module exposes one instance; its entry point names it::

        API_VERSION = "1.1"  # the kvbridge plugin API this plugin was written for
        plugin = ManagerHooks(
            "mytransport", MyManager, api_version=API_VERSION, capabilities={"cross_process"}
        )
        # [project.entry-points."kvbridge.transports"] mytransport = "my_pkg.plugin:plugin"

    ``create(config, rank, kv_regions, aux_regions)`` builds the manager. ``api_version`` is
    reported as is: it must be the version the plugin was *written for* (a literal in the
    plugin), never the running core's ``KVBRIDGE_API_VERSION``, or the load-time check could
    not refuse a plugin written for another API. Left out (plugins written before this keyword
    existed) it is :data:`UNSTATED_API_VERSION`, with a logged note.
    """

    def __init__(
        self,
        name: str,
        create: Callable[..., BookedManager],
        *,
        api_version: str | None = None,
        capabilities: Sequence[str] = (),
        description: str = "",
    ) -> None:
        from kvbridge.types import TransportInfo

        if api_version is None:
            api_version = UNSTATED_API_VERSION
            log.warning(
                "transport %r states no api_version (ManagerHooks took none while the API "
                "was 1.0): taken as kvbridge plugin API %s, this kvbridge speaks %s; pass "
                "api_version= the version the plugin was written for",
                name,
                api_version,
                KVBRIDGE_API_VERSION,
            )

        self.info = TransportInfo(
            name, str(api_version), frozenset(str(c) for c in capabilities), description
        )
        self.create = create

    @hookimpl
    def kvbridge_transport_info(self) -> Any:
        return self.info

    @hookimpl
    def kvbridge_manager_create(
        self, config: Any, rank: Any, kv_regions: Any, aux_regions: Any
    ) -> BookedManager:
        return self.create(config, rank, kv_regions, aux_regions)

    @hookimpl
    def kvbridge_manager_endpoint(self, manager: BookedManager) -> Any:
        return manager.endpoint

    @hookimpl
    def kvbridge_manager_close(self, manager: BookedManager) -> None:
        manager.close()

    @hookimpl
    def kvbridge_receiver_construct(self, manager: BookedManager, room: int) -> None:
        manager.receivers.construct(room)

    @hookimpl
    def kvbridge_receiver_init(self, manager: BookedManager, room: int, peers: Any) -> None:
        manager.init(manager.receivers, room, peers)

    @hookimpl
    def kvbridge_receiver_send_metadata(
        self, manager: BookedManager, room: int, kv_indices: np.ndarray, aux_index: int
    ) -> None:
        manager.receivers.advance(room, KVPoll.Transferring)

    @hookimpl
    def kvbridge_receiver_poll(self, manager: BookedManager, rooms: np.ndarray) -> PollResult:
        return manager.poll(manager.receivers, rooms)

    @hookimpl
    def kvbridge_receiver_abort(self, manager: BookedManager, room: int, reason: str) -> None:
        manager.receivers.abort(room, reason)

    @hookimpl
    def kvbridge_receiver_clear(self, manager: BookedManager, room: int) -> None:
        manager.receivers.clear(room)

    @hookimpl
    def kvbridge_sender_construct(self, manager: BookedManager, room: int) -> None:
        manager.senders.construct(room)

    @hookimpl
    def kvbridge_sender_init(self, manager: BookedManager, room: int, peers: Any) -> None:
        manager.init(manager.senders, room, peers)

    @hookimpl
    def kvbridge_sender_send(self, manager: BookedManager, room: int, chunk: SendChunk) -> None:
        manager.send(room, chunk)

    @hookimpl
    def kvbridge_sender_poll(self, manager: BookedManager, rooms: np.ndarray) -> PollResult:
        return manager.poll(manager.senders, rooms)

    @hookimpl
    def kvbridge_sender_abort(self, manager: BookedManager, room: int, reason: str) -> None:
        manager.senders.abort(room, reason)

    @hookimpl
    def kvbridge_sender_drained(self, manager: BookedManager, rooms: np.ndarray) -> np.ndarray:
        return manager.senders.drained(rooms)

    @hookimpl
    def kvbridge_sender_clear(self, manager: BookedManager, room: int) -> None:
        manager.senders.clear(room)
