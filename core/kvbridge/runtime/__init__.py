"""The I/O edge around :mod:`kvbridge.protocol`: it performs decisions and takes none.

Per role a node (:mod:`~kvbridge.runtime.decode_node`, :mod:`~kvbridge.runtime.prefill_node`)
wires a session to the control channel (:mod:`~kvbridge.runtime.control`), the bootstrap
service (:mod:`kvbridge.bootstrap`) and the transport; the session
(:mod:`~kvbridge.runtime.decode_session`, :mod:`~kvbridge.runtime.prefill_session`) runs the
pure queues step by step; :mod:`~kvbridge.runtime.collective` is the only module that talks to
``torch.distributed``.

A session's step is ``prepare`` (drain control-channel events, resolve prefill targets, poll
the transport once, build the local vector) -> one reduce -> ``finish`` (apply the reduced
vector, execute the decisions). Engines call :meth:`step`; tests with in-process ranks call
``prepare``/``finish`` around their own reducer.

Events from other threads (completion and metadata messages) go through a lock-free deque and
are applied at the start of the next step, so all queue state is touched only by the
scheduler thread.
"""
