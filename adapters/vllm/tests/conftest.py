from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The session fixtures (tiny model, logs, single-instance outputs) live with the pair helpers;
# importing them lazily keeps the unit tests runnable without vLLM.
with contextlib.suppress(ImportError):  # kvbridge.testing.tiny_model needs transformers
    from e2e_common import baseline, logs, model  # noqa: F401
