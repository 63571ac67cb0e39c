"""kvbridge's log records in SGLang's log (see :mod:`kvbridge.logs`).

SGLang configures the root logger's handler per process; kvbridge's lines use it as the
template. The level is ``KVBRIDGE_LOG_LEVEL`` if set, else INFO.
"""

from __future__ import annotations

import logging
import os

from kvbridge.logs import join_engine_log

LOGGERS = ("kvbridge", "kvbridge_sglang")


def route_to_sglang_log() -> None:
    template = next(iter(logging.getLogger().handlers), None) or next(
        iter(logging.getLogger("sglang").handlers), None
    )
    level = os.environ.get("KVBRIDGE_LOG_LEVEL", "").upper() or "INFO"
    join_engine_log(template, level, LOGGERS)
