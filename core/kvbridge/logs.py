"""kvbridge's log records in an engine's log: the same stream and format as its own lines.

Engines configure their own loggers, not kvbridge's: without this, kvbridge's warnings reach
Python's last-resort handler bare (no time, no process) and INFO is lost. The engine adapters
call :func:`join_engine_log` with the engine's handler as the template. Loggers the operator
configured already (they have handlers) are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable


def join_engine_log(
    template: logging.Handler | None, level: int | str, names: Iterable[str]
) -> None:
    """Give each logger in ``names`` a handler writing where ``template`` writes, formatted
    as it formats, at ``level``; a logger that has handlers already is not touched."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.handlers:
            continue
        handler = logging.StreamHandler(getattr(template, "stream", None))
        if template is not None and template.formatter is not None:
            handler.setFormatter(template.formatter)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
