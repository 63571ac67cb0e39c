"""Test helpers and the conformance kit for transport authors.

Importing this module needs pytest (``pip install kvbridge[test]``).
"""

from kvbridge.testing.buffers import RankBuffers, page_pattern
from kvbridge.testing.conformance import TransportConformance
from kvbridge.testing.remote import RemoteReceiver
from kvbridge.testing.rig import ENV_REQUIRE, TransferRig, require_transport, wait_until_terminal

__all__ = [
    "ENV_REQUIRE",
    "RankBuffers",
    "RemoteReceiver",
    "TransferRig",
    "TransportConformance",
    "page_pattern",
    "require_transport",
    "wait_until_terminal",
]
