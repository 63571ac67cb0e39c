"""Synthetic transports for loading and dispatch tests: they record every hook call."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvbridge import KVBRIDGE_API_VERSION, PollResult, TransportInfo, hookimpl
from kvbridge.status import KVPoll


class RecordingTransport:
    def __init__(self, name: str, api_version: str = KVBRIDGE_API_VERSION) -> None:
        self.name = name
        self.api_version = api_version
        self.calls: list[tuple[str, Any]] = []
        self.raise_on: set[str] = set()
        self.extra_statuses = 0  # >0 makes sender_poll answer with the wrong length

    def _record(self, hook: str, room: Any = None) -> None:
        self.calls.append((hook, room))
        if hook in self.raise_on:
            raise RuntimeError(f"{hook} exploded")

    @hookimpl
    def kvbridge_transport_info(self) -> TransportInfo:
        return TransportInfo(self.name, self.api_version, {"fault_injection"})

    @hookimpl
    def kvbridge_manager_create(self, config, rank, kv_regions, aux_regions) -> dict:
        self._record("manager_create")
        return {"owner": self.name}

    @hookimpl
    def kvbridge_manager_endpoint(self, manager) -> dict:
        return {"owner": manager["owner"]}

    @hookimpl
    def kvbridge_manager_close(self, manager) -> None:
        self._record("manager_close")

    @hookimpl
    def kvbridge_receiver_construct(self, manager, room) -> None:
        self._record("receiver_construct", room)

    @hookimpl
    def kvbridge_receiver_init(self, manager, room, peers) -> None:
        self._record("receiver_init", room)

    @hookimpl
    def kvbridge_receiver_send_metadata(self, manager, room, kv_indices, aux_index) -> None:
        self._record("receiver_send_metadata", room)

    @hookimpl
    def kvbridge_receiver_poll(self, manager, rooms) -> PollResult:
        self._record("receiver_poll", len(rooms))
        return PollResult(np.full(len(rooms), KVPoll.Transferring, dtype=np.uint8))

    @hookimpl
    def kvbridge_receiver_abort(self, manager, room, reason) -> None:
        self._record("receiver_abort", room)

    @hookimpl
    def kvbridge_receiver_clear(self, manager, room) -> None:
        self._record("receiver_clear", room)

    @hookimpl
    def kvbridge_sender_construct(self, manager, room) -> None:
        self._record("sender_construct", room)

    @hookimpl
    def kvbridge_sender_init(self, manager, room, peers) -> None:
        self._record("sender_init", room)

    @hookimpl
    def kvbridge_sender_send(self, manager, room, chunk) -> None:
        self._record("sender_send", room)

    @hookimpl
    def kvbridge_sender_poll(self, manager, rooms) -> PollResult:
        self._record("sender_poll", len(rooms))
        return PollResult([KVPoll.Success] * (len(rooms) + self.extra_statuses))

    @hookimpl
    def kvbridge_sender_abort(self, manager, room, reason) -> None:
        self._record("sender_abort", room)

    @hookimpl
    def kvbridge_sender_clear(self, manager, room) -> None:
        self._record("sender_clear", room)


class Recording11(RecordingTransport):
    """With the hook API 1.1 added, so it may state 1.1."""

    @hookimpl
    def kvbridge_sender_drained(self, manager, rooms) -> np.ndarray:
        self._record("sender_drained", len(rooms))
        return np.ones(len(rooms), dtype=bool)


alpha = Recording11("alpha")
beta = Recording11("beta")
#: States 1.1 but has only the 1.0 hooks: it would silently lose the abort fence it claims.
claims_1_1 = RecordingTransport("claims_1_1", api_version="1.1")
#: Honestly written for 1.0: loads, and the core falls back where 1.1 hooks are missing.
written_for_1_0 = RecordingTransport("written_for_1_0", api_version="1.0")
old_api = RecordingTransport("old_api", api_version="0.9")
future_api = RecordingTransport("future_api", api_version="1.99")
misnamed = RecordingTransport("somebody_else")


class MissingHooks:
    @hookimpl
    def kvbridge_transport_info(self) -> TransportInfo:
        return TransportInfo("missing_hooks", KVBRIDGE_API_VERSION)

    @hookimpl
    def kvbridge_receiver_poll(self, manager, rooms) -> PollResult:
        return PollResult([])


missing_hooks = MissingHooks()


class TypoHook(RecordingTransport):
    @hookimpl
    def kvbridge_reciever_poll(self, manager, rooms) -> None:  # misspelt on purpose
        return None


typo_hook = TypoHook("typo_hook")


class MisspeltCapability(RecordingTransport):
    @hookimpl
    def kvbridge_transport_info(self) -> TransportInfo:
        return TransportInfo(self.name, self.api_version, {"one_sided_write"})


misspelt_capability = MisspeltCapability("misspelt_capability")
