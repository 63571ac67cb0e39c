"""Exceptions raised by kvbridge. Every one carries a message a user can act on."""

from __future__ import annotations


class KVBridgeError(Exception):
    """Base class of every kvbridge error."""


class ConfigError(KVBridgeError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class TransportNotFoundError(KVBridgeError, LookupError):
    """The configured transport is not installed, not loaded, or ambiguous."""


class PluginLoadError(KVBridgeError):
    """A transport plugin could not be imported or does not satisfy the contract."""


class IncompatiblePluginError(PluginLoadError):
    """A transport plugin was built for another major version of the plugin API."""


class MemoryRegistrationError(KVBridgeError, ValueError):
    """A transfer touches memory that was never registered, or a registration is invalid."""


class PoolError(KVBridgeError):
    """Base class of page and aux-slot pool misuse."""


class DoubleFreeError(PoolError):
    """An index was returned to a pool that already held it."""


class LeakError(PoolError):
    """Indices were still allocated when the pool was expected to be full."""


class LockstepError(KVBridgeError):
    """Ranks disagree about queue contents before a collective (debug mode only)."""


class KVTransferError(KVBridgeError):
    """A request's KV transfer failed.

    ``from_other_rank`` is true when this rank saw nothing wrong itself and only learned of the
    failure through the reduced status, so logs name the root cause once.
    """

    def __init__(self, room: int, reason: str, *, from_other_rank: bool = False) -> None:
        self.room = room
        self.reason = reason
        self.from_other_rank = from_other_rank
        origin = " (failed on another rank)" if from_other_rank else ""
        super().__init__(f"room {room}: {reason}{origin}")
