"""``sitecustomize`` modules that patch one engine module right after it is imported.

The side-by-side benchmarks run engines' own connectors on a CPU host they were not written
for; where one needs a workaround to start at all, it lives in a ``sitecustomize`` put on
``PYTHONPATH`` of that configuration's processes only, and its text goes into the results.
:func:`shim_source` builds such a module: a meta-path finder that waits for ``module`` and then
runs ``patch`` (the source of a function ``_patch(module)``) once, after the module executed.
"""

from __future__ import annotations

from pathlib import Path

_FINDER = """
import importlib.abc
import importlib.machinery
import sys

_MODULE = {module!r}

{patch}

class _OnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _OnImport())
"""


def shim_source(doc: str, module: str, patch: str) -> str:
    """The text of a ``sitecustomize`` that calls ``patch``'s ``_patch(module)`` once ``module``
    is imported. ``doc`` (its docstring) says what it changes and why."""
    if "def _patch(module)" not in patch:
        raise ValueError("patch must define _patch(module)")
    return f'"""{doc.strip()}\n"""\n' + _FINDER.format(module=module, patch=patch.strip() + "\n")


def write_shim(directory: Path, source: str) -> Path:
    """Write ``source`` as ``directory/sitecustomize.py``; returns the directory (for
    ``PYTHONPATH``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(source)
    return directory


def python_path(directory: Path, environ: dict[str, str]) -> str:
    """``PYTHONPATH`` with ``directory`` first and whatever ``environ`` had after it."""
    rest = environ.get("PYTHONPATH")
    return f"{directory}:{rest}" if rest else str(directory)
