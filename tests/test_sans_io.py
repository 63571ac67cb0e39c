"""The sans-IO line: nothing under kvbridge.protocol reaches threads, sockets, a clock, logging,
torch or pluggy, directly or through the kvbridge modules it imports.

numpy itself imports ``threading`` and ``time``, so what Python has loaded says nothing; this
reads the import statements instead, following every kvbridge module a protocol module names
(and the packages above it, but not ``kvbridge/__init__.py``: that is the public API, which
exports the nodes, and the protocol does not depend on it).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import kvbridge
import kvbridge.protocol

#: What "pure" excludes: threads, sockets, event loops, the clock, log output, the collective,
#: plugin machinery, and the I/O libraries the runtime uses.
FORBIDDEN = frozenset(
    {
        "threading",
        "socket",
        "time",
        "asyncio",
        "torch",
        "pluggy",
        "aiohttp",
        "zmq",
        "logging",
        "selectors",
        "subprocess",
        "multiprocessing",
        "concurrent",
    }
)
ROOT = Path(kvbridge.__file__).parent


def protocol_modules() -> list[str]:
    names = [kvbridge.protocol.__name__]
    names += [
        m.name for m in pkgutil.walk_packages(kvbridge.protocol.__path__, "kvbridge.protocol.")
    ]
    return sorted(names)


def source_of(module: str) -> Path | None:
    """The file of a kvbridge module (None: not a module of this tree)."""
    parts = module.split(".")[1:]
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_by(module: str) -> set[str]:
    """Every module the source of ``module`` names in an import statement."""
    path = source_of(module)
    assert path is not None, module
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import"
            assert node.module is not None
            names.add(node.module)
            # ``from pkg import name`` may name a submodule.
            names.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if source_of(f"{node.module}.{alias.name}") is not None
            )
    return names


def reached_from(module: str) -> dict[str, list[str]]:
    """Every module ``module`` reaches through kvbridge modules, with the chain that reaches it."""
    chains: dict[str, list[str]] = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop()
        for name in sorted(imported_by(current)):
            parts = name.split(".")
            # Importing a.b.c runs the packages a.b above it too (all but kvbridge's own API).
            for depth in range(1, len(parts) + 1):
                step = ".".join(parts[:depth])
                if step in chains or step == "kvbridge":
                    continue
                chains[step] = [*chains[current], step]
                if step.startswith("kvbridge.") and source_of(step) is not None:
                    todo.append(step)
    return chains


def test_every_protocol_module_imports() -> None:
    modules = protocol_modules()
    assert len(modules) > 10  # the walk found the package, not an empty folder
    for name in modules:
        importlib.import_module(name)


@pytest.mark.parametrize("module", protocol_modules())
def test_a_protocol_module_reaches_no_io(module: str) -> None:
    chains = reached_from(module)
    bad = {
        name: " -> ".join(chain)
        for name, chain in chains.items()
        if name.partition(".")[0] in FORBIDDEN
    }
    assert not bad, f"{module} is not pure: " + "; ".join(sorted(bad.values()))


def test_the_check_sees_an_import_through_another_kvbridge_module() -> None:
    """The follow-through works: the runtime reads the clock itself, and reaches zmq only
    through another kvbridge module, which the chain names."""
    chains = reached_from("kvbridge.runtime.decode_session")
    assert chains["time"] == ["kvbridge.runtime.decode_session", "time"]
    chain = reached_from("kvbridge.runtime.decode_node")["zmq"]
    assert chain[0] == "kvbridge.runtime.decode_node" and chain[-1] == "zmq"
    assert any(step == "kvbridge.runtime.control" for step in chain)
