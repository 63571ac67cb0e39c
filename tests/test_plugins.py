"""Plugin discovery, contract checks, and dispatch to exactly the configured transport."""

from __future__ import annotations

import importlib.metadata as md

import numpy as np
import pytest

from kvbridge import (
    KVPoll,
    RankIdentity,
    Role,
    TransferConfig,
    Transport,
    TransportNotFoundError,
    TransportRegistry,
)
from kvbridge.errors import IncompatiblePluginError
from kvbridge.transport.hookspecs import KVBRIDGE_API_VERSION
from kvbridge.transport.loading import TRANSPORT_GROUP, check_api_version
from kvbridge_fake import plugin as fake_plugin
from sample_plugins import recording


def ep(name: str, value: str) -> md.EntryPoint:
    return md.EntryPoint(name=name, value=value, group=TRANSPORT_GROUP)


SYNTHETIC = [
    ep("alpha", "sample_plugins.recording:alpha"),
    ep("beta", "sample_plugins.recording:beta"),
    ep("broken", "sample_plugins.broken_import"),
    ep("old_api", "sample_plugins.recording:old_api"),
    ep("future_api", "sample_plugins.recording:future_api"),
    ep("missing_hooks", "sample_plugins.recording:missing_hooks"),
    ep("typo_hook", "sample_plugins.recording:typo_hook"),
    ep("misnamed", "sample_plugins.recording:misnamed"),
    ep("misspelt_capability", "sample_plugins.recording:misspelt_capability"),
]


@pytest.fixture
def registry() -> TransportRegistry:
    for t in (recording.alpha, recording.beta):
        t.calls.clear()
        t.raise_on.clear()
        t.extra_statuses = 0
    return TransportRegistry.discover(SYNTHETIC, environ={})


def error_of(registry: TransportRegistry, name: str) -> str:
    (record,) = [r for r in registry.records() if r.name == name]
    assert not record.loaded
    assert record.error
    return record.error


def test_good_plugins_load_and_broken_ones_do_not_block_them(registry: TransportRegistry) -> None:
    assert registry.names() == ["alpha", "beta"]
    assert "ModuleNotFoundError" in error_of(registry, "broken")


def test_wrong_major_api_version_is_refused_naming_both_versions(
    registry: TransportRegistry,
) -> None:
    message = error_of(registry, "old_api")
    assert "0.9" in message and KVBRIDGE_API_VERSION in message


def test_newer_minor_api_version_is_refused() -> None:
    with pytest.raises(IncompatiblePluginError, match="upgrade kvbridge"):
        check_api_version("1.5", core_version="1.0")
    check_api_version("1.0", core_version="1.3")
    with pytest.raises(IncompatiblePluginError, match=r"MAJOR\.MINOR"):
        check_api_version("one")


def test_missing_and_misspelt_hooks_are_refused(registry: TransportRegistry) -> None:
    missing = error_of(registry, "missing_hooks")
    assert "kvbridge_sender_send" in missing and "missing required hook" in missing
    assert "kvbridge_reciever_poll" in error_of(registry, "typo_hook")


def test_plugin_must_call_itself_by_its_entry_point_name(registry: TransportRegistry) -> None:
    assert "somebody_else" in error_of(registry, "misnamed")


def test_two_plugins_claiming_one_name_are_both_refused() -> None:
    registry = TransportRegistry.discover(
        [
            ep("alpha", "sample_plugins.recording:alpha"),
            ep("alpha", "sample_plugins.recording:beta"),
        ],
        environ={},
    )
    records = [r for r in registry.records() if r.name == "alpha"]
    assert len(records) == 2 and not any(r.loaded for r in records)
    assert "claimed by" in records[0].error
    with pytest.raises(TransportNotFoundError, match="claimed by"):
        registry.get("alpha")


def test_unknown_transport_lists_the_installed_ones(registry: TransportRegistry) -> None:
    with pytest.raises(TransportNotFoundError, match="installed and loaded: alpha, beta"):
        Transport.from_config(TransferConfig(transport="gamma"), registry)
    with pytest.raises(TransportNotFoundError, match="unusable"):
        registry.get("old_api")


def test_allow_and_block_lists_from_the_environment() -> None:
    allowed = TransportRegistry.discover(
        SYNTHETIC[:2], environ={"KVBRIDGE_TRANSPORTS_ALLOW": "beta"}
    )
    assert allowed.names() == ["beta"]
    assert "KVBRIDGE_TRANSPORTS_ALLOW" in error_of(allowed, "alpha")
    blocked = TransportRegistry.discover(
        SYNTHETIC[:2], environ={"KVBRIDGE_TRANSPORTS_BLOCK": "alpha"}
    )
    assert blocked.names() == ["beta"]
    assert "blocked" in error_of(blocked, "alpha")


def test_the_installed_fake_transport_loads_from_its_entry_point() -> None:
    registry = TransportRegistry.discover()
    (fake,) = [r for r in registry.records() if r.name == "fake"]
    assert fake.loaded, fake.error
    assert fake.distribution == "kvbridge-fake"
    assert fake.api_version == fake_plugin.API_VERSION  # what the plugin states
    assert "fault_injection" in fake.capabilities


def test_dispatch_reaches_only_the_configured_transport(registry: TransportRegistry) -> None:
    transport = Transport.from_config(TransferConfig(transport="beta"), registry)
    manager = transport.create_manager(
        TransferConfig(transport="beta"), RankIdentity(Role.DECODE), (), ()
    )
    assert manager.endpoint == {"owner": "beta"}
    manager.receiver_construct(5)
    manager.receiver_init(5, ())
    manager.receiver_send_metadata(5, np.arange(3), 0)
    statuses, _ = manager.receiver_poll(np.array([5], dtype=np.uint64))
    manager.sender_construct(6)
    manager.sender_poll(np.array([6, 7], dtype=np.uint64))
    manager.close()
    assert recording.alpha.calls == []
    assert [c[0] for c in recording.beta.calls] == [
        "manager_create",
        "receiver_construct",
        "receiver_init",
        "receiver_send_metadata",
        "receiver_poll",
        "sender_construct",
        "sender_poll",
        "manager_close",
    ]
    assert statuses.tolist() == [KVPoll.Transferring]


def test_a_plugin_exception_becomes_a_local_failure_of_that_room_only(
    registry: TransportRegistry,
) -> None:
    recording.alpha.raise_on.add("receiver_init")
    transport = Transport(registry.get("alpha"))
    manager = transport.create_manager(
        TransferConfig(transport="alpha"), RankIdentity(Role.DECODE), (), ()
    )
    manager.receiver_construct(1)
    manager.receiver_construct(2)
    manager.receiver_init(1, ())
    recording.alpha.raise_on.clear()
    manager.receiver_init(2, ())
    statuses, failures = manager.receiver_poll(np.array([1, 2], dtype=np.uint64))
    assert statuses.tolist() == [KVPoll.Failed, KVPoll.Transferring]
    assert "receiver_init exploded" in failures[1]
    manager.receiver_clear(1)
    assert manager.failure_of(1) is None


def test_a_poll_that_raises_or_lies_fails_every_polled_room(registry: TransportRegistry) -> None:
    transport = Transport(registry.get("alpha"))
    manager = transport.create_manager(
        TransferConfig(transport="alpha"), RankIdentity(Role.PREFILL), (), ()
    )
    recording.alpha.raise_on.add("sender_poll")
    statuses, failures = manager.sender_poll(np.array([3, 4], dtype=np.uint64))
    assert statuses.tolist() == [KVPoll.Failed, KVPoll.Failed]
    assert set(failures) == {3, 4}
    recording.alpha.raise_on.clear()
    recording.alpha.extra_statuses = 1
    statuses, failures = manager.sender_poll(np.array([3, 4], dtype=np.uint64))
    assert statuses.tolist() == [KVPoll.Failed, KVPoll.Failed]
    assert "3 statuses for 2 rooms" in failures[3]


def test_a_misspelt_capability_is_a_load_error_naming_it(registry: TransportRegistry) -> None:
    error = error_of(registry, "misspelt_capability")
    assert "unknown transport capability 'one_sided_write'" in error
    assert "one_sided_writes" in error  # the known names are listed


def test_capabilities_are_typed_and_the_fence_policy_reads_them() -> None:
    from kvbridge import Capability, TransportInfo

    info = TransportInfo("t", "1.1", ["one_sided_writes", Capability.CROSS_PROCESS])
    assert info.capabilities == {Capability.ONE_SIDED_WRITES, Capability.CROSS_PROCESS}
    assert info.one_sided_writes and "cross_process" in info.capabilities
    assert not TransportInfo("t", "1.1").one_sided_writes
    with pytest.raises(ValueError, match="unknown transport capability 'gpudirect'"):
        TransportInfo("t", "1.1", ["gpudirect"])
