"""Transfer status, ordered so that MIN across ranks gives the least advanced rank."""

from __future__ import annotations

import enum


class KVPoll(enum.IntEnum):
    """Status of one request's KV transfer on one rank.

    The order is the protocol: reducing with MIN over ranks yields the status of the least
    advanced rank, and ``Failed`` (0) dominates everything.
    """

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


TERMINAL = frozenset({KVPoll.Failed, KVPoll.Success})
