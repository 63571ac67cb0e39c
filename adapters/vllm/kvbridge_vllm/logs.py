"""kvbridge's log records in vLLM's log: same stream, same format (process tag, timestamp).

vLLM configures only its own ``vllm`` logger, so without this kvbridge's warnings reach
Python's last-resort handler bare, with no time or process, and INFO is lost. The level is
``KVBRIDGE_LOG_LEVEL`` if set, else vLLM's (``VLLM_LOGGING_LEVEL``). Loggers the operator has
configured already (they have handlers) are left alone.
"""

from __future__ import annotations

import logging
import os

from kvbridge.logs import join_engine_log

LOGGERS = ("kvbridge", "kvbridge_vllm")


def route_to_vllm_log() -> None:
    vllm_logger = logging.getLogger("vllm")
    template = next(iter(vllm_logger.handlers), None)
    level: int | str = os.environ.get("KVBRIDGE_LOG_LEVEL", "").upper() or (
        vllm_logger.getEffectiveLevel()
    )
    join_engine_log(template, level, LOGGERS)
