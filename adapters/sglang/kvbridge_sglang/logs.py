"""kvbridge's log records in SGLang's log: same stream and format as SGLang's own lines.

SGLang configures its loggers (``sglang`` and the root logger's handler, per process), not
kvbridge's; without this kvbridge's warnings would reach Python's last-resort handler bare and
INFO would be lost. The level is ``KVBRIDGE_LOG_LEVEL`` if set, else INFO. Loggers the operator
configured already (they have handlers) are left alone.
"""

from __future__ import annotations

import logging
import os

LOGGERS = ("kvbridge", "kvbridge_sglang")


def route_to_sglang_log() -> None:
    root = logging.getLogger()
    template = next(iter(root.handlers), None) or next(
        iter(logging.getLogger("sglang").handlers), None
    )
    level = os.environ.get("KVBRIDGE_LOG_LEVEL", "").upper() or "INFO"
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if logger.handlers:
            continue
        handler = logging.StreamHandler(getattr(template, "stream", None))
        if template is not None and template.formatter is not None:
            handler.setFormatter(template.formatter)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
