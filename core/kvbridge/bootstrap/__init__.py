"""The bootstrap service: where a prefill instance's ranks are, and which DP rank serves a room.

It is a service of its own (a prefill rank 0 runs it, or ``kvbridge bootstrap`` alone), so
both of its ends live here: :mod:`~kvbridge.bootstrap.server` (aiohttp),
:mod:`~kvbridge.bootstrap.http_client` (blocking requests),
:mod:`~kvbridge.bootstrap.registration` (a prefill's registration, kept across server
restarts) and :mod:`~kvbridge.bootstrap.directory` (decode's non-blocking view of the
prefills it uses). What a room's plan is, given a server's answer, is
:mod:`kvbridge.protocol.plan`'s.
"""
