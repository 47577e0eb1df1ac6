"""Registries: one per component kind, filled by the plugins' register hooks."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdplug.errors import KdplugError, PluginError, UsageError, record_origin
from kdplug.spec import Spec, parse_spec

# kind name on the CLI -> (register hook, whether the factory takes a REF, one of them)
KINDS: dict[str, tuple[str, bool, str]] = {
    "teachers": ("register_teachers", True, "teacher"),
    "students": ("register_students", True, "student"),
    "losses": ("register_losses", False, "loss"),
    "combiners": ("register_combiners", False, "combiner"),
    "label-generators": ("register_label_generators", False, "label generator"),
    "datasets": ("register_datasets", True, "dataset"),
}


@dataclass(frozen=True)
class Component:
    """One registered factory and the plugin it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.factory) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def options(self) -> dict[str, inspect.Parameter] | None:
        """Keyword options the factory accepts, or None when it takes ``**options``."""
        params = _signature(self.factory).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        skip = 1 if KINDS[self.kind][1] else 0
        named = [p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return {p.name: p for p in named[skip:]}


def _signature(factory: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(factory, eval_str=True)
    except (NameError, TypeError, ValueError):
        return inspect.signature(factory)


def _check_type(component: Component, key: str, value: Any, param: inspect.Parameter) -> Any:
    """Coerce int to float where a float is declared; refuse values of the wrong type."""
    expected = param.annotation
    if expected is bool and not isinstance(value, bool):
        raise UsageError(f"{component.name}: option {key}={value!r} must be true or false")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (int, float) and (isinstance(value, bool) or not isinstance(value, expected)):
        raise UsageError(f"{component.name}: option {key}={value!r} must be {expected.__name__}")
    if expected is str and not isinstance(value, str):
        return str(value)
    return value


class Registry:
    """Named factories of one kind, e.g. all teachers."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}")
        self.kind = kind
        _, self.takes_ref, self.singular = KINDS[kind]
        self._components: dict[str, Component] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._components

    def __iter__(self):
        return iter(sorted(self._components.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        return sorted(self._components)

    def add(self, name: str, factory: Callable[..., Any], plugin: str) -> None:
        if not isinstance(name, str) or not name or not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered an invalid {self.singular} {name!r}")
        taken = self._components.get(name)
        if taken is not None:
            raise PluginError(
                f"{self.kind} name {name!r} is registered by both plugin {taken.plugin!r} "
                f"and plugin {plugin!r}"
            )
        self._components[name] = Component(self.kind, name, factory, plugin)

    def remove_plugin(self, plugin: str) -> None:
        self._components = {n: c for n, c in self._components.items() if c.plugin != plugin}

    def get(self, name: str) -> Component:
        try:
            return self._components[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(self.names()) or "none registered"
            raise UsageError(f"unknown {self.singular} {name!r}{hint} (known: {known})") from None

    def create(self, spec: str | Spec, *args: Any, **extra: Any) -> Any:
        """Build a component from a spec; ``args`` follow REF (e.g. num_classes, in_chans)."""
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        component = self.get(spec.name)
        options = {**spec.options, **extra}
        accepted = component.options()
        if accepted is not None:
            for key in list(options):
                if key not in accepted:
                    allowed = ", ".join(sorted(accepted)) or "none"
                    raise UsageError(f"{spec.name}: unknown option {key!r} (accepted: {allowed})")
                options[key] = _check_type(component, key, options[key], accepted[key])
        if self.takes_ref:
            if spec.ref is None:
                raise UsageError(f"{spec.name} needs a reference: {spec.name}:REF")
            args = (spec.ref, *args)
        elif spec.ref is not None:
            raise UsageError(
                f"bad spec {spec.text!r}: {spec.name} takes no reference, only key=value options"
            )
        try:
            built = component.factory(*args, **options)
            record_origin(built, component.plugin, f"{self.singular} {spec.text!r}")
            return built
        except KdplugError:
            raise
        except Exception as exc:  # a plugin bug: name the plugin and the component
            raise PluginError(
                f"plugin {component.plugin!r} failed to build {self.singular} "
                f"{spec.name!r}: {type(exc).__name__}: {exc}"
            ) from exc
