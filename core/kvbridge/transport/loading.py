"""Discover and load transport plugins from the ``kvbridge.transports`` entry-point group.

Each plugin is loaded on its own: an import error, a wrong API version or a missing hook is
recorded against that plugin and never stops the others. Each loaded transport gets its own
pluggy manager, so calling an operation hook reaches exactly one transport.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pluggy

from kvbridge.errors import IncompatiblePluginError, PluginLoadError, TransportNotFoundError
from kvbridge.native import NativeLibraryMissing
from kvbridge.transport.hookspecs import (
    HOOKS_ADDED,
    KVBRIDGE_API_VERSION,
    PROJECT_NAME,
    REQUIRED_HOOKS,
    TransportSpec,
)
from kvbridge.types import TransportInfo

log = logging.getLogger("kvbridge")

TRANSPORT_GROUP = "kvbridge.transports"
#: Comma-separated names: load only these transports / never load these.
ENV_ALLOW = "KVBRIDGE_TRANSPORTS_ALLOW"
ENV_BLOCK = "KVBRIDGE_TRANSPORTS_BLOCK"


@attrs.frozen
class TransportRecord:
    """What ``kvbridge transports`` shows for one installed transport."""

    name: str
    entry_point: str
    distribution: str | None = None
    version: str | None = None
    api_version: str | None = None
    capabilities: frozenset[str] = frozenset()
    description: str = ""
    error: str | None = None
    #: Commands that fix ``error`` (a missing native library), when the plugin said so.
    fixes: tuple[str, ...] = ()

    @property
    def loaded(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "api_version": self.api_version,
            "capabilities": sorted(self.capabilities),
            "description": self.description,
            "entry_point": self.entry_point,
            "loaded": self.loaded,
            "error": self.error,
            "fixes": list(self.fixes),
        }


@attrs.frozen(eq=False)
class LoadedTransport:
    """A transport that passed every load check, with its private plugin manager."""

    record: TransportRecord
    info: TransportInfo
    plugin_manager: pluggy.PluginManager


def _version(text: str) -> tuple[int, int]:
    major, minor = (int(x) for x in str(text).split("."))
    return major, minor


def check_api_version(plugin_version: str, core_version: str = KVBRIDGE_API_VERSION) -> None:
    """Raise :class:`IncompatiblePluginError` unless a plugin's API version fits this core."""
    try:
        p_major, p_minor = _version(plugin_version)
        c_major, c_minor = _version(core_version)
    except ValueError:
        raise IncompatiblePluginError(
            f"plugin API version {plugin_version!r} is not of the form MAJOR.MINOR"
        ) from None
    if p_major != c_major:
        raise IncompatiblePluginError(
            f"plugin was built for kvbridge plugin API {plugin_version}, but this kvbridge "
            f"speaks API {core_version}; install a plugin release for API {c_major}.x"
        )
    if p_minor > c_minor:
        raise IncompatiblePluginError(
            f"plugin needs kvbridge plugin API {plugin_version}, newer than this kvbridge's "
            f"API {core_version}; upgrade kvbridge"
        )


def build_plugin_manager(name: str, plugin: object) -> tuple[pluggy.PluginManager, TransportInfo]:
    """Register ``plugin`` on a fresh manager and run every contract check on it."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(TransportSpec)
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"invalid hook implementation: {exc}") from exc
    missing = [h for h in REQUIRED_HOOKS if not getattr(pm.hook, h).get_hookimpls()]
    if missing:
        raise PluginLoadError(f"missing required hook(s): {', '.join(missing)}")
    info = pm.hook.kvbridge_transport_info()
    if not isinstance(info, TransportInfo):
        raise PluginLoadError(
            f"kvbridge_transport_info returned {type(info).__name__}, expected TransportInfo"
        )
    if info.name != name:
        raise PluginLoadError(
            f"plugin calls itself {info.name!r} but is installed under the name {name!r}"
        )
    check_api_version(info.api_version)
    stated = _version(info.api_version)
    lacking = [
        f"{hook} (added in API {since})"
        for hook, since in HOOKS_ADDED.items()
        if _version(since) <= stated and not getattr(pm.hook, hook).get_hookimpls()
    ]
    if lacking:
        raise PluginLoadError(
            f"plugin states kvbridge plugin API {info.api_version} but lacks "
            f"{', '.join(lacking)}: implement it, or state the older API version the plugin "
            f"was written for"
        )
    if stated < _version(KVBRIDGE_API_VERSION):
        log.info(
            "kvbridge transport %r was written for plugin API %s (this kvbridge speaks %s): "
            "loaded; hooks added since are optional for it",
            name,
            info.api_version,
            KVBRIDGE_API_VERSION,
        )
    return pm, info


def _split_env(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(part.strip() for part in value.split(",") if part.strip())


class TransportRegistry:
    """The installed transports: loaded ones and the reasons the others failed."""

    def __init__(self) -> None:
        self._records: dict[str, TransportRecord] = {}
        self._loaded: dict[str, LoadedTransport] = {}

    @classmethod
    def discover(
        cls,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        *,
        allow: Iterable[str] | None = None,
        block: Iterable[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> TransportRegistry:
        """Load every transport entry point (default: the installed ``kvbridge.transports``).

        ``allow``/``block`` default to the comma-separated ``KVBRIDGE_TRANSPORTS_ALLOW`` and
        ``KVBRIDGE_TRANSPORTS_BLOCK`` environment variables.
        """
        environ = os.environ if environ is None else environ
        allowed = frozenset(allow) if allow is not None else _split_env(environ.get(ENV_ALLOW))
        blocked = frozenset(block) if block is not None else _split_env(environ.get(ENV_BLOCK))
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=TRANSPORT_GROUP)
        by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
        for ep in entry_points:
            by_name.setdefault(ep.name, []).append(ep)

        registry = cls()
        for name, eps in sorted(by_name.items()):
            if len(eps) > 1:
                owners = " and ".join(f"{_dist_name(ep) or '?'} ({ep.value})" for ep in eps)
                error = f"the name {name!r} is claimed by {owners}; uninstall all but one"
                for ep in eps:
                    registry._add(_record(ep, error=error))
                continue
            ep = eps[0]
            if allowed is not None and name not in allowed:
                registry._add(_record(ep, error=f"not in {ENV_ALLOW}={','.join(sorted(allowed))}"))
            elif blocked and name in blocked:
                registry._add(_record(ep, error=f"blocked by {ENV_BLOCK}"))
            else:
                registry._load(ep)
        return registry

    def _add(self, record: TransportRecord, loaded: LoadedTransport | None = None) -> None:
        key = record.name
        # Conflicting records share a name; keep each one visible under a distinct key.
        while key in self._records:
            key += "'"
        self._records[key] = record
        if loaded is not None:
            self._loaded[record.name] = loaded

    def _load(self, ep: importlib.metadata.EntryPoint) -> None:
        try:
            plugin = ep.load()
        except NativeLibraryMissing as exc:
            log.info("kvbridge transport %r: native library missing: %s", ep.name, exc)
            self._add(attrs.evolve(_record(ep, error=str(exc)), fixes=exc.fixes))
            return
        except Exception as exc:
            # Shown by `kvbridge transports`; a missing optional library is not a warning.
            log.info("kvbridge transport %r failed to import: %s", ep.name, exc)
            self._add(_record(ep, error=f"import failed: {type(exc).__name__}: {exc}"))
            return
        self.register(ep.name, plugin, entry_point=ep)

    def register(
        self,
        name: str,
        plugin: object,
        *,
        entry_point: importlib.metadata.EntryPoint | None = None,
    ) -> TransportRecord:
        """Load a plugin object directly (tests and in-tree transports); errors are recorded."""
        base = _record(entry_point) if entry_point else TransportRecord(name, repr(plugin))
        try:
            pm, info = build_plugin_manager(name, plugin)
        except PluginLoadError as exc:
            log.warning("kvbridge transport %r refused: %s", name, exc)
            record = attrs.evolve(base, error=str(exc))
            self._add(record)
            return record
        except Exception as exc:
            record = attrs.evolve(base, error=f"plugin raised {type(exc).__name__}: {exc}")
            self._add(record)
            return record
        record = attrs.evolve(
            base,
            api_version=info.api_version,
            capabilities=info.capabilities,
            description=info.description,
        )
        self._add(record, LoadedTransport(record, info, pm))
        return record

    def records(self) -> list[TransportRecord]:
        return sorted(self._records.values(), key=lambda r: (r.name, r.entry_point))

    def names(self) -> list[str]:
        return sorted(self._loaded)

    def get(self, name: str) -> LoadedTransport:
        """Return a loaded transport or explain precisely why it is not available."""
        if name in self._loaded:
            return self._loaded[name]
        failed = [r for r in self._records.values() if r.name == name]
        if failed:
            fixes = "".join(f"; fix: {fix}" for fix in failed[0].fixes)
            raise TransportNotFoundError(
                f"transport {name!r} is installed but unusable: {failed[0].error}{fixes}"
            )
        installed = ", ".join(self.names()) or "none"
        raise TransportNotFoundError(
            f"no transport named {name!r}; installed and loaded: {installed} "
            f"(see `kvbridge transports`)"
        )


def _dist_name(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else None


def _record(ep: importlib.metadata.EntryPoint, *, error: str | None = None) -> TransportRecord:
    dist = getattr(ep, "dist", None)
    return TransportRecord(
        name=ep.name,
        entry_point=ep.value,
        distribution=dist.name if dist is not None else None,
        version=dist.version if dist is not None else None,
        error=error,
    )
