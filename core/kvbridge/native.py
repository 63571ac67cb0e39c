"""Decide whether a transport's native library is installed, without importing it.

A transport plugin module calls :func:`check_native` at import time, before anything else::

    from kvbridge.native import check_native, python_module, shared_library

    check_native(
        "nixl",
        python_module("nixl", "nixl_cu12", "nixl_cu13", fix='pip install "kvbridge-nixl[cpu]"'),
        shared_library("ibverbs", fix="apt-get install --no-install-recommends libibverbs1"),
    )

Where something is missing it raises :class:`NativeLibraryMissing`, so the entry point fails
to load and ``kvbridge transports`` lists the plugin as NOT LOADED with the commands that fix
it. Nothing is imported or loaded to decide:

- a Python module is looked up with :func:`importlib.util.find_spec` on a **top-level** name,
  which asks the import path finders whether the module exists and executes none of its code
  (a dotted name would import its parent packages, so only top-level names are accepted).
  Importing a native binding is unsafe at listing time: it loads shared libraries (UCX,
  ibverbs, ROCm) that may abort the process, print, spawn threads or take seconds.
- a shared library is looked up with :func:`ctypes.util.find_library`, which reads the
  dynamic linker's cache (``ldconfig -p``) and never ``dlopen``\\ s the library.

The check answers "is it installed", not "does it work": a library that is present but broken
still fails when the manager is created, with the library's own error.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
from collections.abc import Callable

import attrs


@attrs.frozen
class Requirement:
    """One thing a transport needs: how to name it, how to look for it, how to install it."""

    what: str
    fix: str
    present: Callable[[], bool] = attrs.field(eq=False, repr=False)


class NativeLibraryMissing(ImportError):
    """A transport's native library is not installed; ``fixes`` are the commands to run."""

    def __init__(self, transport: str, missing: tuple[Requirement, ...]) -> None:
        self.transport = transport
        self.missing = missing
        self.fixes = tuple(dict.fromkeys(r.fix for r in missing))
        names = ", ".join(r.what for r in missing)
        super().__init__(f"{transport} needs {names}, which is not installed here")


def _module_present(names: tuple[str, ...]) -> bool:
    for name in names:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def python_module(*names: str, fix: str) -> Requirement:
    """The Python module ``names[0]`` (or any of the alternatives after it) is installed."""
    if not names:
        raise ValueError("name at least one module")
    for name in names:
        if not name.isidentifier():
            raise ValueError(
                f"{name!r}: give a top-level module name (a dotted name would import its parent)"
            )
    what = f"the Python module {names[0]!r}"
    if len(names) > 1:
        what = f"one of the Python modules {', '.join(repr(n) for n in names)}"
    return Requirement(what, fix, lambda: _module_present(names))


def shared_library(name: str, *, fix: str) -> Requirement:
    """The shared library ``lib<name>.so`` is known to the dynamic linker."""
    return Requirement(
        f"the shared library lib{name}", fix, lambda: ctypes.util.find_library(name) is not None
    )


def check_native(transport: str, *requirements: Requirement) -> None:
    """Raise :class:`NativeLibraryMissing` naming every missing requirement and its fix."""
    missing = tuple(r for r in requirements if not r.present())
    if missing:
        raise NativeLibraryMissing(transport, missing)
