"""Warnings a peer can trigger at will, kept from filling the log.

Every frame from the network is untrusted (rule 9): whatever a peer may cause once it may cause
a million times. A :class:`ThrottledWarning` logs the first occurrence in full, then at most one
summary per ``interval`` saying how many more there were and what the latest said. The caller
passes the time, so the class holds no clock and the same instance can be driven by a test's.
"""

from __future__ import annotations

import logging
from typing import Any

#: Seconds between two summaries of one kind of warning.
SUMMARY_INTERVAL = 10.0


class ThrottledWarning:
    """One kind of warning, rate-limited; not thread-safe (use one per thread)."""

    def __init__(
        self, logger: logging.Logger, what: str, interval: float = SUMMARY_INTERVAL
    ) -> None:
        self.logger = logger
        self.what = what
        self.interval = interval
        #: Every occurrence, logged or not.
        self.count = 0
        self._suppressed = 0
        self._latest: tuple[str, tuple[Any, ...]] = ("", ())
        self._next = float("-inf")

    def __call__(self, now: float, msg: str, *args: Any) -> None:
        self.count += 1
        if not self._suppressed and now >= self._next:
            self.logger.warning(msg, *args, stacklevel=2)
            self._next = now + self.interval
            return
        self._suppressed += 1
        self._latest = (msg, args)
        self._flush(now)

    def flush(self, now: float) -> None:
        """Log the summary if one is due; cheap when nothing is (call it once per step)."""
        self._flush(now)

    def _flush(self, now: float) -> None:
        if not self._suppressed or now < self._next:
            return
        msg, args = self._latest
        self.logger.warning(
            "%d more %s since the last report (every %gs at most); the latest: " + msg,
            self._suppressed,
            self.what,
            self.interval,
            *args,
            stacklevel=3,  # the code that called __call__ or flush
        )
        self._suppressed = 0
        self._next = now + self.interval
