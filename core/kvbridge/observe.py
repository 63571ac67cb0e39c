"""The observer hooks (``ObserverSpec``): the relay that broadcasts them to every observer
plugin, and the helpers that feed them from the nodes."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pluggy

from kvbridge.transport.hookspecs import PROJECT_NAME, ObserverSpec
from kvbridge.types import RankIdentity

log = logging.getLogger("kvbridge")

OBSERVER_GROUP = "kvbridge.observers"
#: An observer's hook function and the arguments it declares (None: pluggy's own caller).
_Impl = tuple[Callable[..., Any], tuple[str, ...] | None]


class ObserverRelay:
    """Broadcasts observer hooks to every plugin of the ``kvbridge.observers`` group.

    The observers are fixed when the relay is built. Each hook's implementations are looked
    up once and then called directly, in pluggy's order and with the arguments each declares:
    pluggy's own call machinery cost more than the Prometheus exporter's work, on every step
    and several times per request. One observer that raises is logged and skipped; the others
    still hear the call.
    """

    def __init__(self, observers: Iterable[object] = (), *, discover: bool = False) -> None:
        self.plugin_manager = pluggy.PluginManager(PROJECT_NAME)
        self.plugin_manager.add_hookspecs(ObserverSpec)
        if discover:
            for ep in importlib.metadata.entry_points(group=OBSERVER_GROUP):
                try:
                    self.plugin_manager.register(ep.load(), name=ep.name)
                except ImportError as exc:  # an optional extra that is not installed
                    log.info("kvbridge observer %r not loaded: %s", ep.name, exc)
                except Exception as exc:
                    log.warning("kvbridge observer %r not loaded: %s", ep.name, exc)
        for observer in observers:
            self.plugin_manager.register(observer)
        self.active = bool(self.plugin_manager.get_plugins())
        self._impls: dict[str, tuple[_Impl, ...]] = {}

    def _implementations(self, hook: str) -> tuple[_Impl, ...]:
        impls = self._impls.get(hook)
        if impls is None:
            caller = getattr(self.plugin_manager.hook, hook)
            found = caller.get_hookimpls()
            if any(impl.hookwrapper or getattr(impl, "wrapper", False) for impl in found):
                # A wrapper needs pluggy's machinery: the whole hook goes through it.
                impls = ((caller, None),)
            else:
                # pluggy calls the last registered first (tryfirst / trylast sorted in)
                impls = tuple((impl.function, tuple(impl.argnames)) for impl in reversed(found))
            self._impls[hook] = impls
        return impls

    def call(self, hook: str, **kwargs: Any) -> None:
        if not self.active:
            return
        for function, names in self._implementations(hook):
            try:
                if names is None:
                    function(**kwargs)
                else:
                    function(*[kwargs[name] for name in names])
            except Exception:
                log.exception("kvbridge observer hook %s raised; ignored", hook)


class ControlLosses:
    """Turns the control channel's loss counters into ``kvbridge_control_dropped`` calls.

    The counters grow on the control thread (malformed frames) and the scheduler thread
    (refused sends); :meth:`check` runs on the scheduler thread once per step and costs two
    attribute reads when nothing was lost.
    """

    def __init__(
        self,
        observers: ObserverRelay,
        rank: RankIdentity,
        receiver: Any,
        senders: Sequence[Any],
        untrusted: Callable[[], int] | None = None,
    ) -> None:
        self.observers = observers
        self.rank = rank
        self.receiver = receiver
        self.senders = tuple(senders)
        self.untrusted = untrusted
        self._malformed = 0
        self._send_failed = 0
        self._rejected = 0
        self._untrusted = 0

    def check(self) -> None:
        if not self.observers.active:
            return
        malformed = self.receiver.dropped
        if malformed != self._malformed:
            self._report(malformed - self._malformed, "malformed")
            self._malformed = malformed
        send_failed = sum(s.failed for s in self.senders)
        if send_failed != self._send_failed:
            self._report(send_failed - self._send_failed, "send_failed")
            self._send_failed = send_failed
        rejected = getattr(self.receiver, "rejected", 0)
        if rejected != self._rejected:  # failed authentication (shared secret)
            self._report(rejected - self._rejected, "unauthenticated")
            self._rejected = rejected
        untrusted = self.untrusted() if self.untrusted is not None else 0
        if untrusted != self._untrusted:  # a sender not allowed to say that (rule 9)
            self._report(untrusted - self._untrusted, "untrusted")
            self._untrusted = untrusted

    def _report(self, count: int, cause: str) -> None:
        self.observers.call(
            "kvbridge_control_dropped",
            role=self.rank.role,
            rank=self.rank,
            count=count,
            cause=cause,
        )
