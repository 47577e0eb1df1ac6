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

Every hook call goes through pluggy, so pluggy orders it (wrappers, ``tryfirst``,
``trylast``) and ``pm.trace`` / ``add_hookcall_monitoring`` see it. A registry hook is
called on the plugin being added alone (its components are filed under it, and its failure
skips it alone); an event hook's implementations are guarded as they register, so one
listener's failure is a warning naming its plugin and the others still run.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Generator
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


def env_flag(variable: str) -> bool:
    """Whether the environment variable is set to 1, true, yes or on (any case)."""
    return os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")


class _Pluggy(pluggy.PluginManager):
    """pluggy's manager, with each event-hook implementation guarded as it registers."""

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        registered = super().register(plugin, name)
        for hook in self.get_hookcallers(plugin) or []:
            if hook.name in hookspecs.EVENT_HOOKS:
                for impl in hook.get_hookimpls():
                    if impl.plugin is plugin:
                        # Final to type checkers only: pluggy calls impl.function each time
                        impl.function = _guarded(impl, hook.name)  # type: ignore[misc]
        return registered


class PluginManager:
    """A pluggy manager plus one Registry per component kind."""

    def __init__(self) -> None:
        self.pm = _Pluggy(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registries = {kind: Registry(kind) for kind in KINDS}
        self.plugins: dict[str, PluginInfo] = {}
        self.strict = env_flag("KDPLUG_STRICT_PLUGINS")

    # -- loading -----------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every allowed plugin of the ``kdplug`` entry-point group, first-party first."""
        blocked, only = _names("KDPLUG_BLOCK_PLUGINS"), _names("KDPLUG_LOAD_PLUGINS")
        autoload = not env_flag("KDPLUG_DISABLE_PLUGIN_AUTOLOAD")
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
            reason = "; ".join(str(exc).splitlines())  # pluggy's reasons span lines
            self._failed(info, f"invalid plugin: {reason}", exc)
            return info
        info.hooks = sorted(
            hook.name for hook in self.pm.get_hookcallers(plugin) or [] if hook.name
        )
        for kind, (hook_name, _, _) in KINDS.items():
            if hook_name not in info.hooks:
                continue
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
        """Call ``hook_name`` on ``plugin`` alone, filing what it registers under ``name``."""
        registry = self.registries[kind]
        self._only(hook_name, plugin)(register=lambda n, f: registry.add(n, f, name))

    def _only(self, hook_name: str, plugin: Any) -> pluggy.HookCaller:
        """``hook_name``'s caller for ``plugin`` alone (still pluggy's call: ordered, traced)."""
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        return self.pm.subset_hook_caller(hook_name, others)

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
        """Call an event hook on every plugin, through pluggy. A listener cannot change the
        run: its failure (any exception, kdplug's own or ``sys.exit`` included) is a warning
        naming its plugin, and the other listeners still run."""
        getattr(self.pm.hook, hook_name)(**kwargs)

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add its click commands to ``cli``; a command already there
        (kdplug's own or an earlier plugin's) is kept, with a warning naming both."""
        owners: dict[str, str | None] = dict.fromkeys(cli.commands)  # None: kdplug's own
        impls = self.pm.hook.register_commands.get_hookimpls()
        for plugin, obj in dict((impl.plugin_name, impl.plugin) for impl in impls).items():
            before = dict(cli.commands)
            try:
                self._only("register_commands", obj)(cli=cli)
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


def _guarded(impl: pluggy.HookImpl, hook_name: str) -> Callable[..., Any]:
    """``impl``'s function, its failure a warning naming its plugin instead of an exception
    that would end the hook call for the other plugins."""

    def warn(exc: BaseException) -> None:
        log.warning("plugin %r raised in %s: %s", impl.plugin_name, hook_name, describe(exc))

    function = impl.function
    if impl.wrapper or impl.hookwrapper:
        return _guarded_wrapper(function, hook_name, warn)

    @functools.wraps(function)
    def listener(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (Exception, SystemExit) as exc:
            warn(exc)
            return None

    return listener


def _guarded_wrapper(
    function: Callable[..., Any], hook_name: str, warn: Callable[[BaseException], None]
) -> Callable[..., Generator[None, Any, Any]]:
    """A wrapper's generator function that always yields once and passes on what pluggy
    sends, whatever the wrapper does before or after its ``yield``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Generator[None, Any, Any]:
        try:
            teardown = function(*args, **kwargs)
            next(teardown)
        except StopIteration:
            warn(RuntimeError(f"wrapper {hook_name} did not yield"))
            return (yield)
        except (Exception, SystemExit) as exc:
            warn(exc)
            return (yield)
        try:
            result = yield
        except BaseException:  # an interrupt from inside: the wrapper's cleanup runs
            teardown.close()
            raise
        try:
            teardown.send(result)
        except StopIteration as stop:
            return stop.value
        except (Exception, SystemExit) as exc:
            warn(exc)
            return result
        teardown.close()
        warn(RuntimeError(f"wrapper {hook_name} yielded twice"))
        return result

    return wrapper


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
