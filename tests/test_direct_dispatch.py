"""Hooks called without pluggy's per-call machinery answer exactly as pluggy would.

The transport facade and the observer relay look each hook's implementations up once and call
them directly (``direct_caller``, ``ObserverRelay.call``); pluggy stays for anything it must
do itself (no implementation, wrappers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pluggy

from kvbridge.observe import ObserverRelay
from kvbridge.transport.facade import direct_caller
from kvbridge.transport.hookspecs import PROJECT_NAME, TransportSpec, hookimpl
from kvbridge.types import PollResult, Role


def _manager(*plugins: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(TransportSpec)
    for plugin in plugins:
        pm.register(plugin)
    return pm


class _Polls:
    """A transport plugin whose poll declares fewer arguments than the spec."""

    @hookimpl
    def kvbridge_receiver_poll(self, rooms: np.ndarray) -> PollResult:
        return PollResult(np.full(len(rooms), 4, dtype=np.uint8), {})

    @hookimpl
    def kvbridge_receiver_clear(self, manager: Any, room: int) -> None:
        manager.append(room)


def test_one_implementation_is_called_with_the_arguments_it_declares() -> None:
    hook = _manager(_Polls()).hook
    call = direct_caller(hook.kvbridge_receiver_poll)
    assert call is not hook.kvbridge_receiver_poll
    rooms = np.array([3, 5], dtype=np.uint64)
    direct = call(object(), rooms)  # the spec's arguments, by position
    assert (
        direct.statuses.tolist()
        == hook.kvbridge_receiver_poll(manager=object(), rooms=rooms).statuses.tolist()
    )
    cleared: list[int] = []
    assert direct_caller(hook.kvbridge_receiver_clear)(cleared, 7) is None
    assert cleared == [7]


def test_arguments_declared_in_another_order_land_by_name() -> None:
    class Reordered:
        @hookimpl
        def kvbridge_receiver_send_metadata(
            self, aux_index: int, room: int, kv_indices: np.ndarray
        ) -> tuple[int, int, list[int]]:
            return aux_index, room, kv_indices.tolist()

    hook = _manager(Reordered()).hook.kvbridge_receiver_send_metadata
    indices = np.array([4, 5], dtype=np.int64)
    answer = (9, 2, [4, 5])
    assert direct_caller(hook)(None, 2, indices, 9) == answer
    assert hook(manager=None, room=2, kv_indices=indices, aux_index=9) == answer


def test_no_implementation_and_wrappers_keep_pluggy() -> None:
    hook = _manager(_Polls()).hook
    missing = hook.kvbridge_sender_drained  # an API 1.0 plugin has none: pluggy answers None
    assert direct_caller(missing)(None, np.zeros(1, dtype=np.uint64)) is None

    wrapped_rooms: list[list[int]] = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def kvbridge_receiver_poll(self, rooms: np.ndarray) -> Iterator[None]:
            wrapped_rooms.append(rooms.tolist())
            return (yield)

    wrapped = _manager(_Polls(), Wrapper()).hook.kvbridge_receiver_poll
    result = direct_caller(wrapped)(None, np.array([1, 2], dtype=np.uint64))
    assert result.statuses.tolist() == [4, 4]
    assert wrapped_rooms == [[1, 2]]  # the wrapper ran: pluggy made the call


def _step(relay: ObserverRelay) -> None:
    relay.call(
        "kvbridge_step",
        role=Role.DECODE,
        rank=None,
        queued=2,
        reduced=2,
        stages=np.zeros(2, dtype=np.uint8),
        fenced_bytes=0,
    )


def test_observers_hear_in_pluggys_order_with_their_own_arguments() -> None:
    heard: list[tuple[str, tuple[Any, ...]]] = []

    class Queued:
        @pluggy.HookimplMarker(PROJECT_NAME)
        def kvbridge_step(self, queued: int) -> None:
            heard.append(("queued", (queued,)))

    class Everything:
        @pluggy.HookimplMarker(PROJECT_NAME)
        def kvbridge_step(self, role: Role, stages: np.ndarray, fenced_bytes: int) -> None:
            heard.append(("everything", (role, len(stages), fenced_bytes)))

    first, second = Queued(), Everything()
    relay = ObserverRelay([first, second])
    _step(relay)
    pluggy_order: list[tuple[str, tuple[Any, ...]]] = heard[:]
    heard.clear()
    relay.plugin_manager.hook.kvbridge_step(
        role=Role.DECODE,
        rank=None,
        queued=2,
        reduced=2,
        stages=np.zeros(2, dtype=np.uint8),
        fenced_bytes=0,
    )
    assert pluggy_order == heard == [("everything", (Role.DECODE, 2, 0)), ("queued", (2,))]


def test_an_observer_that_raises_does_not_silence_the_others() -> None:
    heard: list[int] = []

    class Counts:
        @pluggy.HookimplMarker(PROJECT_NAME)
        def kvbridge_step(self, queued: int) -> None:
            heard.append(queued)

    class Broken:
        @pluggy.HookimplMarker(PROJECT_NAME)
        def kvbridge_step(self) -> None:
            raise RuntimeError("observer bug")

    relay = ObserverRelay([Counts(), Broken()])  # Broken registered last: called first
    _step(relay)
    _step(relay)
    assert heard == [2, 2]
