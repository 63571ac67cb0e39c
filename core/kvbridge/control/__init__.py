"""The control channel between prefill and decode ranks."""

from kvbridge.control.channel import ControlReceiver, ControlSender
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
