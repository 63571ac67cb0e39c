"""The kvbridge protocol, sans I/O: every decision, and nothing that performs one.

Nothing in this package starts a thread, opens a socket, reads a clock, logs, or imports
torch or pluggy (``tests/test_sans_io.py`` holds that line): callers pass in what they
observed and the time, and get decisions back. :mod:`kvbridge.runtime` performs them.

- :mod:`~kvbridge.protocol.messages`: the control messages, their wire format, and who may
  send each (:data:`~kvbridge.protocol.messages.WHO_MAY_SEND`, rule 9).
- :mod:`~kvbridge.protocol.auth`: the seal that authenticates a frame under a shared secret.
- :mod:`~kvbridge.protocol.decode`: the decode machine: its gated queues, trust in the room's
  writers, and the decode half of the abort fence.
- :mod:`~kvbridge.protocol.prefill` (the gated queues) and
  :mod:`~kvbridge.protocol.prefill_rooms` (binding, trust, early and ended rooms, who hears of
  an abort, drain-then-acknowledge): the prefill machine.
- :mod:`~kvbridge.protocol.columns`, :mod:`~kvbridge.protocol.outcomes`: the queues' storage
  and what a step hands back.
- :mod:`~kvbridge.protocol.early`: messages for rooms a prefill rank has not been given yet.
- :mod:`~kvbridge.protocol.plan`: prefill keys, the write plan of a room, each side's view of
  the other.
- :mod:`~kvbridge.protocol.liveness`: which writers have gone quiet.
- :mod:`~kvbridge.protocol.mapping`: which prefill ranks write what into which decode rank.
"""
