"""Everything between the core and a transport plugin.

- :mod:`~kvbridge.transport.hookspecs`: the contract a transport implements, fully documented.
- :mod:`~kvbridge.transport.loading`: entry-point discovery and the checks a plugin passes
  when it loads (one broken plugin never blocks the others).
- :mod:`~kvbridge.transport.facade`: the typed facade through which a node calls exactly one
  configured transport, turning plugin misbehaviour into local failures.
- :mod:`kvbridge.transport.kit`: building blocks most transports need (per-room statuses,
  per-peer worker threads, a manager base class and its hooks).
"""
