"""The Fake transport's hooks.

This is the shape third-party transports copy: a manager class that subclasses
:class:`kvbridge.transport.kit.BookedManager` (writing only the transport's own calls), and a
:class:`~kvbridge.transport.kit.ManagerHooks` instance that the entry point names::

    [project.entry-points."kvbridge.transports"]
    fake = "kvbridge_fake.plugin:plugin"

The Fake has no native library, so it has no :func:`kvbridge.native.check_native` call.
"""

from __future__ import annotations

from kvbridge.transport.kit import ManagerHooks
from kvbridge_fake.manager import FakeManager

#: The kvbridge plugin API this plugin was written for (not the running core's version).
API_VERSION = "1.1"

plugin = ManagerHooks(
    "fake",
    FakeManager,
    api_version=API_VERSION,
    capabilities=("cross_process", "fault_injection", "rejects_unregistered_memory"),
    description="CPU transport over memmove and loopback TCP, with fault injection",
)
