"""The plugin manager: entry-point discovery, environment switches, failure isolation.

Plugins are found in the ``kdplug`` entry-point group; kdplug's own plugins are found
there too, exactly as a third-party plugin is. Environment switches:

- ``KDPLUG_DISABLE_PLUGIN_AUTOLOAD=1``: load only kdplug's own (first-party) plugins.
- ``KDPLUG_LOAD_PLUGINS=a,b``: load only these third-party plugins (first-party ones stay).
- ``KDPLUG_BLOCK_PLUGINS=a,b``: never load these (first-party ones included).
- ``KDPLUG_STRICT_PLUGINS=1``: a plugin that fails to load raises instead of warning.

Names match an entry-point name, a distribution name, or both as ``DISTRIBUTION:NAME``
(``kdplug:datasets`` is kdplug's own ``datasets`` plugin only). Two plugins with one
entry-point name: the first (kdplug's own first) loads, the other is reported as failed,
with the names that choose between them. A plugin's command never replaces a command
that is already there (kdplug's own, or an earlier plugin's): it is kept, with a warning.
A plugin that calls ``sys.exit`` fails like one that raises.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from kdplug import hookspecs
from kdplug.errors import PluginError, describe
from kdplug.registry import KINDS, Registry

GROUP = "kdplug"
FIRST_PARTY = "kdplug"
log = logging.getLogger("kdplug")


@dataclass
class PluginInfo:
    """What ``kdplug plugins`` shows about one plugin."""

    name: str
    version: str | None = None
    distribution: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "distribution": self.distribution,
            "hooks": self.hooks,
            "components": self.components,
            "error": self.error,
        }


def _names(variable: str) -> set[str]:
    return {n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()}


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")


class PluginManager:
    """A pluggy manager plus one Registry per component kind."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registries = {kind: Registry(kind) for kind in KINDS}
        self.plugins: dict[str, PluginInfo] = {}
        self.strict = _flag("KDPLUG_STRICT_PLUGINS")

    # -- loading -----------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every allowed plugin of the ``kdplug`` entry-point group, first-party first."""
        blocked, only = _names("KDPLUG_BLOCK_PLUGINS"), _names("KDPLUG_LOAD_PLUGINS")
        autoload = not _flag("KDPLUG_DISABLE_PLUGIN_AUTOLOAD")
        points = sorted(
            metadata.entry_points(group=GROUP),
            key=lambda ep: (_dist_name(ep) != FIRST_PARTY, ep.name, _dist_name(ep) or ""),
        )
        for ep in points:
            dist = _dist_name(ep)
            names = {ep.name, dist, f"{dist}:{ep.name}"}
            if names & blocked:
                continue
            if dist != FIRST_PARTY and (not autoload or (only and not names & only)):
                continue
            taken = self.plugins.get(ep.name)
            if taken is not None:
                if taken.distribution != dist:
                    self._name_taken(ep, dist, taken)
                continue
            info = self.plugins[ep.name] = PluginInfo(ep.name, _dist_version(ep), dist)
            try:
                module = ep.load()
            except (Exception, SystemExit) as exc:
                self._failed(info, f"import failed: {describe(exc)}", exc)
                continue
            self.add(module, ep.name, info)

    def _name_taken(self, ep: metadata.EntryPoint, dist: str | None, taken: PluginInfo) -> None:
        """Report a plugin not loaded because an earlier one has its entry-point name."""
        name = f"{dist}:{ep.name}"
        info = self.plugins[name] = PluginInfo(name, _dist_version(ep), dist)
        first = f"{taken.distribution}:{taken.name}"
        self._failed(
            info,
            f"plugin {taken.name!r} of {taken.distribution!r} has the same name and loads "
            f"instead; KDPLUG_BLOCK_PLUGINS={first} loads this one, "
            f"KDPLUG_BLOCK_PLUGINS={name} keeps {first} without this warning",
        )

    def add(self, plugin: Any, name: str, info: PluginInfo | None = None) -> PluginInfo:
        """Register one plugin object and collect its components; a failure is isolated."""
        info = info or PluginInfo(name, getattr(plugin, "__version__", None))
        self.plugins[name] = info
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except (Exception, SystemExit) as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._failed(info, f"invalid plugin: {exc}", exc)
            return info
        info.hooks = sorted(
            hook.name for hook in self.pm.get_hookcallers(plugin) or [] if hook.name
        )
        for kind, (hook_name, _, _) in KINDS.items():
            try:
                self._collect(kind, hook_name, plugin, name)
            except (Exception, SystemExit) as exc:
                for registry in self.registries.values():
                    registry.remove_plugin(name)
                self.pm.unregister(plugin)
                info.components = {}
                self._failed(info, f"{hook_name} failed: {describe(exc)}", exc)
                return info
        info.components = {
            kind: [c.name for c in reg if c.plugin == name]
            for kind, reg in self.registries.items()
            if any(c.plugin == name for c in reg)
        }
        return info

    def _collect(self, kind: str, hook_name: str, plugin: Any, name: str) -> None:
        registry = self.registries[kind]
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                _call(impl, register=lambda n, f: registry.add(n, f, name))

    def _failed(self, info: PluginInfo, message: str, exc: BaseException | None = None) -> None:
        info.error = message
        if self.strict:
            raise PluginError(f"plugin {info.name!r}: {message}") from exc
        log.warning("plugin %r failed to load and is skipped: %s", info.name, message)

    # -- using -------------------------------------------------------------------------
    def create(self, kind: str, spec: Any, *args: Any, **options: Any) -> Any:
        """Build a component of ``kind`` (e.g. ``"teachers"``) from its spec string."""
        return self.registries[kind].create(spec, *args, **options)

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook on every plugin. A listener cannot change the run: its
        failure (any exception, kdplug's own or ``sys.exit`` included) is a warning."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                _call(impl, **kwargs)
            except (Exception, SystemExit) as exc:
                log.warning(
                    "plugin %r raised in %s: %s", impl.plugin_name, hook_name, describe(exc)
                )

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add its click commands to ``cli``; a command already there
        (kdplug's own or an earlier plugin's) is kept, with a warning naming both."""
        owners: dict[str, str | None] = dict.fromkeys(cli.commands)  # None: kdplug's own
        for impl in self.pm.hook.register_commands.get_hookimpls():
            plugin, before = impl.plugin_name, dict(cli.commands)
            try:
                _call(impl, cli=cli)
            except (Exception, SystemExit) as exc:
                message = f"register_commands failed: {describe(exc)}"
                if self.strict:
                    raise PluginError(f"plugin {plugin!r}: {message}") from exc
                self.plugins[plugin].error = message
                log.warning("plugin %r failed in register_commands: %s", plugin, describe(exc))
            for command, kept in before.items():
                if cli.commands.get(command) is not kept:
                    cli.commands[command] = kept
                    _replaced(plugin, command, owners[command])
            owners.update(dict.fromkeys(cli.commands.keys() - owners.keys(), plugin))


def _replaced(plugin: str, command: str, owner: str | None) -> None:
    """Warn that ``plugin`` tried to replace ``command`` and was refused."""
    if owner is None:
        log.warning(
            "plugin %r tried to replace kdplug's command %r; kdplug's is kept", plugin, command
        )
        return
    log.warning(
        "plugin %r tried to replace the command %r of plugin %r, which is kept; "
        "KDPLUG_BLOCK_PLUGINS=%s gives it to plugin %r",
        plugin,
        command,
        owner,
        owner,
        plugin,
    )


def _call(impl: Any, **kwargs: Any) -> Any:
    """Call one hook implementation with the arguments it asks for."""
    return impl.function(**{k: kwargs[k] for k in impl.argnames})


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _dist_version(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else None


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager; entry points are loaded on first use, once."""
    global _manager
    if _manager is None:
        manager = PluginManager()
        manager.load_entry_points()
        _manager = manager
    return _manager


def reset_manager(manager: PluginManager | None = None) -> None:
    """Forget the loaded plugins (tests use this); the next get_manager() reloads them."""
    global _manager
    _manager = manager


def create(kind: str, spec: Any, *args: Any, **options: Any) -> Any:
    """Build a component from its spec with the process-wide plugin manager."""
    return get_manager().create(kind, spec, *args, **options)


__all__ = ["PluginManager", "PluginInfo", "get_manager", "reset_manager", "create"]
