"""Writing a benchmark's results: ``results/<stem>.md`` (keeping the notes written by hand
below the script's notes mark) and ``results/<stem>.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def notes_mark(script: str) -> str:
    """The line after which a results file is written by hand and kept on every rewrite."""
    return f"<!-- notes: written by hand, kept by benchmarks/{script} -->"


def write_results(stem: str, text: str, data: Any, mark: str, indent: int = 2) -> None:
    RESULTS.mkdir(exist_ok=True)
    md = RESULTS / f"{stem}.md"
    old = md.read_text() if md.exists() else ""
    if mark in old:
        text += "\n" + old[old.index(mark) :]
    md.write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=indent) + "\n")
