"""Registries: one per component kind, filled by the plugins' register hooks."""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kdplug.errors import KdplugError, PluginError, UsageError, describe, record_origin
from kdplug.spec import Quoted, Raw, Spec, guess_value, parse_spec

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
        named, anything = _parameters(self.factory, 1 if KINDS[self.kind][1] else 0)
        return None if anything else named


def _signature(factory: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(factory, eval_str=True)
    except (NameError, TypeError, ValueError):
        return inspect.signature(factory)


def _parameters(
    factory: Callable[..., Any], skip: int
) -> tuple[dict[str, inspect.Parameter], bool]:
    """The factory's named options (less the first ``skip``) and whether it takes ``**``."""
    params = _signature(factory).parameters.values()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    anything = any(p.kind is p.VAR_KEYWORD for p in params)
    return {p.name: p for p in named[skip:]}, anything


def closest(name: str, names: Iterable[str]) -> str | None:
    """The known name nearest to a mistyped ``name`` (for "did you mean"), or None."""
    found = difflib.get_close_matches(name, list(names), n=1)
    return found[0] if found else None


def _unknown(owner: str, key: str, accepted: dict[str, inspect.Parameter]) -> UsageError:
    allowed = ", ".join(sorted(accepted)) or "none"
    return UsageError(f"{owner}: unknown option {key!r} (accepted: {allowed})")


# -- typed options: spec text -> the values a factory's annotations ask for ----------------
_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")
_NONE_TYPE = type(None)


def _members(kind: Any) -> tuple[Any, ...]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def _is_list(kind: Any) -> bool:
    return kind is list or typing.get_origin(kind) is list


def _is_typed(kind: Any) -> bool:
    """An annotation kdplug converts text to (the others get the old guess)."""
    return kind in (bool, int, float, str) or typing.get_origin(kind) is typing.Literal


def from_text(text: Raw, kind: Any) -> Any:
    """Spec text (a string or a list of strings) as the annotation ``kind`` asks.

    ``none``/``null`` (unquoted, any case) is None where ``kind`` allows None; then the
    members of a union are tried in the order written, the first to accept the text wins
    (so ``float | str`` reads ``4`` as 4.0, ``str | int`` keeps ``01``). A single value
    tries the scalar members before the list ones (``list[float]`` takes ``0.5`` as
    ``[0.5]``); a list (``a;b``) only the list ones. ``bool`` takes true/false, yes/no,
    on/off, 1/0; ``int`` an integer; ``float`` a finite number; ``str`` any text verbatim;
    ``Literal[...]`` one of its values. No annotation, ``Any`` or another type: the old
    guess (``kdplug.spec.guess_value``). Raises ValueError when nothing accepts the text.
    """
    members = _members(kind)
    if _NONE_TYPE in members and isinstance(text, str) and not isinstance(text, Quoted):
        if text.lower() in _NONE:
            return None
    members = tuple(m for m in members if m is not _NONE_TYPE)
    if isinstance(text, list):
        candidates = [m for m in members if _is_list(m) or not _is_typed(m)]
    else:
        candidates = sorted(members, key=_is_list)  # stable: the scalar ones first
    for member in candidates:
        try:
            return _as(text, member)
        except ValueError:
            continue
    raise ValueError(f"{text!r} is not {_describe(kind)}")


def _as(text: Raw, kind: Any) -> Any:
    if _is_list(kind):
        item = (typing.get_args(kind) or (Any,))[0]
        return [from_text(t, item) for t in (text if isinstance(text, list) else [text])]
    if not _is_typed(kind):
        return guess_value(text)
    if kind is bool and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    if kind is int:
        return int(text)
    if kind is float and math.isfinite(value := float(text)):
        return value
    if kind is str:
        return str(text)
    for choice in typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ():
        if str(choice) == text:
            return choice
    raise ValueError(text)


def _describe(kind: Any) -> str:
    """``kind`` in words for an error: ``float or a list of float or none``."""
    words = []
    for member in _members(kind):
        if member is bool:
            words.append("true or false")
        elif member is _NONE_TYPE:
            words.append("none")
        elif _is_list(member):
            item = typing.get_args(member)
            words.append(f"a list of {_describe(item[0])}" if item else "a list")
        elif typing.get_origin(member) is typing.Literal:
            words.append(" or ".join(str(c) for c in typing.get_args(member)))
        else:
            words.append(getattr(member, "__name__", str(member)))
    return " or ".join(words)


def _typed_value(owner: str, key: str, text: Raw, kind: Any) -> Any:
    try:
        return from_text(text, kind)
    except ValueError:
        shown = ";".join(text) if isinstance(text, list) else text
        hint = ""
        if isinstance(text, list) and not any(_is_list(m) for m in _members(kind)):
            hint = f' (quote a value holding ";": {key}="{shown}")'
        elif isinstance(text, str) and float in _members(kind) and _non_finite(text):
            hint = " (a finite number)"
        raise UsageError(
            f"{owner}: option {key}={shown!r} must be {_describe(kind)}{hint}"
        ) from None


def _non_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def typed_options(
    factory: Callable[..., Any], options: dict[str, Raw], owner: str, skip: int = 0
) -> dict[str, Any]:
    """Spec option text (``Spec.raw``) typed by ``factory``'s signature (see ``from_text``),
    less its first ``skip`` parameters (a REF). A factory taking ``**options`` gets its
    other options guessed. An unknown option or text its annotation refuses is a
    UsageError naming ``owner``: ``threshold: option tau='high' must be float``."""
    named, anything = _parameters(factory, skip)
    typed = {}
    for key, text in options.items():
        if key not in named and not anything:
            raise _unknown(owner, key, named)
        kind = named[key].annotation if key in named else inspect.Parameter.empty
        typed[key] = _typed_value(owner, key, text, kind)
    return typed


def _check_type(component: Component, key: str, value: Any, param: inspect.Parameter) -> Any:
    """A Python value given in code: int to float where a float is declared; refuse values
    of the wrong simple type."""
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
                f"and plugin {plugin!r} (KDPLUG_BLOCK_PLUGINS=NAME skips the one you do not want)"
            )
        self._components[name] = Component(self.kind, name, factory, plugin)

    def remove_plugin(self, plugin: str) -> None:
        self._components = {n: c for n, c in self._components.items() if c.plugin != plugin}

    def get(self, name: str) -> Component:
        try:
            return self._components[name]
        except KeyError:
            close = closest(name, self.names())
            hint = f"; did you mean {close!r}?" if close else ""
            known = ", ".join(self.names()) or "none registered"
            raise UsageError(f"unknown {self.singular} {name!r}{hint} (known: {known})") from None

    def create(self, spec: str | Spec, *args: Any, **extra: Any) -> Any:
        """Build a component from a spec; ``args`` follow REF (e.g. num_classes, in_chans).

        The spec's option text is typed by the factory's signature (``typed_options``);
        ``extra`` options are Python values, checked against it."""
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        component = self.get(spec.name)
        if spec.raw is not None:
            skip = 1 if self.takes_ref else 0
            ref = spec.ref if spec.ref is None or spec.ref.isprintable() else repr(spec.ref)
            owner = spec.name if ref is None else f"{spec.name}:{ref}"  # one line
            options = typed_options(component.factory, spec.raw, owner, skip)
            options.update(self._checked(component, extra))
        else:
            options = self._checked(component, {**spec.options, **extra})
        if self.takes_ref:
            if spec.ref is None:
                raise UsageError(
                    f'{spec.name} needs a reference: {spec.name}:REF (quote a REF holding "=": '
                    f'{spec.name}:"a=b")'
                )
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
        except (Exception, SystemExit) as exc:  # a plugin bug: name the plugin and the component
            raise PluginError(
                f"plugin {component.plugin!r} failed to build {self.singular} "
                f"{spec.name!r}: {describe(exc)}"
            ) from exc

    @staticmethod
    def _checked(component: Component, values: dict[str, Any]) -> dict[str, Any]:
        """Options given as Python values, checked against the factory's signature."""
        accepted = component.options()
        if accepted is None:
            return dict(values)
        for key in values:
            if key not in accepted:
                raise _unknown(component.name, key, accepted)
        return {k: _check_type(component, k, v, accepted[k]) for k, v in values.items()}
