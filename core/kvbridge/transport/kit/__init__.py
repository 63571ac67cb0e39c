"""The transport kit: building blocks most transports need, so a plugin only writes the native
calls.

- :class:`RegionSet`: is a batch of (addr, length) runs inside registered memory?
- :class:`RoomBook`: thread-safe per-room statuses with the contract's rules built in
  (forward only, sticky Failed, idempotent clear, late results for cleared rooms ignored).
- :class:`PeerWorkers`: one thread per peer running blocking native calls in submission
  order, so ``send`` never blocks the scheduler and writes to one peer stay ordered;
  :class:`PipelinedPeerWorkers`: one thread per peer keeping several rooms' non-blocking
  writes in flight (each room's still in order).
- :class:`BookedManager` + :class:`ManagerHooks`: a manager base class that uses all of the
  above, and the hook implementations for it; a transport then writes only its native calls.
"""

from kvbridge.transport.kit.book import RoomBook, RoomState
from kvbridge.transport.kit.hooks import UNSTATED_API_VERSION, ManagerHooks
from kvbridge.transport.kit.manager import BookedManager
from kvbridge.transport.kit.options import transport_options
from kvbridge.transport.kit.regions import RegionSet
from kvbridge.transport.kit.workers import PeerWorkers, PipelinedPeerWorkers

__all__ = [
    "UNSTATED_API_VERSION",
    "BookedManager",
    "ManagerHooks",
    "PeerWorkers",
    "PipelinedPeerWorkers",
    "RegionSet",
    "RoomBook",
    "RoomState",
    "transport_options",
]
