"""The module paths of the layout before protocol/, runtime/ and transport/ still import, for
one release, and name the very objects of their new homes (engines and plugins import them)."""

from __future__ import annotations

import importlib

import pytest

OLD_TO_NEW = [
    ("kvbridge.node", "DecodeNode", "kvbridge.runtime.decode_node"),
    ("kvbridge.node", "PrefillNode", "kvbridge.runtime.prefill_node"),
    ("kvbridge.queue", "DecodeRequest", "kvbridge.protocol.decode"),
    ("kvbridge.queue", "PrefillRequest", "kvbridge.protocol.prefill"),
    ("kvbridge.queue", "TorchMinReducer", "kvbridge.runtime.collective"),
    ("kvbridge.queue", "DecodeSession", "kvbridge.runtime.decode_session"),
    ("kvbridge.queue", "PrefillTarget", "kvbridge.protocol.plan"),
    ("kvbridge.queue.decode", "FROM_OTHER_RANK", "kvbridge.protocol.outcomes"),
    ("kvbridge.queue.decode", "DecodeQueue", "kvbridge.protocol.decode"),
    ("kvbridge.queue.prefill", "PrefillQueue", "kvbridge.protocol.prefill"),
    ("kvbridge.queue.columns", "TRANSFERRING", "kvbridge.protocol.columns"),
    ("kvbridge.queue.outcomes", "DecodeStep", "kvbridge.protocol.outcomes"),
    ("kvbridge.queue.early", "EarlyMessages", "kvbridge.protocol.early"),
    ("kvbridge.queue.collective", "SingleRankReducer", "kvbridge.runtime.collective"),
    ("kvbridge.queue.collective", "init_gloo", "kvbridge.runtime.collective"),
    ("kvbridge.queue.session", "DecodePeer", "kvbridge.protocol.plan"),
    ("kvbridge.queue.session", "PrefillSession", "kvbridge.runtime.prefill_session"),
    ("kvbridge.queue.wiring", "log_abort", "kvbridge.runtime.wiring"),
    ("kvbridge.queue.decode_session", "DecodeSession", "kvbridge.runtime.decode_session"),
    ("kvbridge.queue.prefill_session", "PrefillSession", "kvbridge.runtime.prefill_session"),
    ("kvbridge.control", "Status", "kvbridge.protocol.messages"),
    ("kvbridge.control", "ControlReceiver", "kvbridge.runtime.control"),
    ("kvbridge.control.messages", "encode", "kvbridge.protocol.messages"),
    ("kvbridge.control.auth", "Sealer", "kvbridge.protocol.auth"),
    ("kvbridge.control.channel", "ControlSender", "kvbridge.runtime.control"),
    ("kvbridge.bootstrap.client", "BootstrapClient", "kvbridge.bootstrap.http_client"),
    ("kvbridge.bootstrap.client", "BootstrapError", "kvbridge.bootstrap.http_client"),
    ("kvbridge.bootstrap.client", "BootstrapDirectory", "kvbridge.bootstrap.directory"),
    ("kvbridge.bootstrap.client", "Contact", "kvbridge.protocol.plan"),
    ("kvbridge.hookspecs", "hookimpl", "kvbridge.transport.hookspecs"),
    ("kvbridge.hookspecs", "TransportSpec", "kvbridge.transport.hookspecs"),
    ("kvbridge.transports", "Transport", "kvbridge.transport.facade"),
    ("kvbridge.plugins", "TransportRegistry", "kvbridge.transport.loading"),
    ("kvbridge.plugins", "check_api_version", "kvbridge.transport.loading"),
    ("kvbridge.plugins", "ObserverRelay", "kvbridge.observe"),
    ("kvbridge.transport_kit", "ManagerHooks", "kvbridge.transport.kit.hooks"),
    ("kvbridge.transport_kit", "BookedManager", "kvbridge.transport.kit.manager"),
    ("kvbridge.transport_kit", "transport_options", "kvbridge.transport.kit.options"),
    ("kvbridge.transport_kit", "RoomBook", "kvbridge.transport.kit.book"),
    ("kvbridge.transport_kit", "PeerWorkers", "kvbridge.transport.kit.workers"),
    ("kvbridge.mapping", "routes", "kvbridge.protocol.mapping"),
    ("kvbridge.liveness", "WriterLiveness", "kvbridge.protocol.liveness"),
]


@pytest.mark.parametrize(("old", "name", "new"), OLD_TO_NEW)
def test_an_old_path_names_the_new_object(old: str, name: str, new: str) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), name
    )


def test_the_nodes_and_their_requests_come_from_kvbridge_itself() -> None:
    import kvbridge

    for name, new in [
        ("DecodeNode", "kvbridge.runtime.decode_node"),
        ("PrefillNode", "kvbridge.runtime.prefill_node"),
        ("DecodeRequest", "kvbridge.protocol.decode"),
        ("PrefillRequest", "kvbridge.protocol.prefill"),
    ]:
        assert getattr(kvbridge, name) is getattr(importlib.import_module(new), name)
        assert name in kvbridge.__all__
