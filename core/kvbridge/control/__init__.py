"""Moved: the messages to :mod:`kvbridge.protocol.messages`, the channel to
:mod:`kvbridge.runtime.control`. This old package (and its modules) is kept for one release."""

from kvbridge.protocol.messages import (
    Abort,
    AbortAck,
    Heartbeat,
    MalformedFrame,
    Message,
    Metadata,
    Register,
    Status,
    Waiting,
    decode,
    encode,
)
from kvbridge.runtime.control import ControlReceiver, ControlSender

__all__ = [
    "Abort",
    "AbortAck",
    "ControlReceiver",
    "ControlSender",
    "Heartbeat",
    "MalformedFrame",
    "Message",
    "Metadata",
    "Register",
    "Status",
    "Waiting",
    "decode",
    "encode",
]
