"""The control channel between prefill and decode ranks."""

from kvbridge.control.channel import ControlReceiver, ControlSender
from kvbridge.control.messages import (
    Abort,
    AbortAck,
    MalformedFrame,
    Message,
    Metadata,
    Register,
    Status,
    decode,
    encode,
)

__all__ = [
    "Abort",
    "AbortAck",
    "ControlReceiver",
    "ControlSender",
    "MalformedFrame",
    "Message",
    "Metadata",
    "Register",
    "Status",
    "decode",
    "encode",
]
