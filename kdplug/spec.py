r"""Spec strings: ``NAME[:REF][,key=value,...]`` naming a component and its options.

Examples: ``timm:resnet18,checkpoint=t.safetensors``, ``kd,T=4``, ``kd:T=4``,
``disk:data/unlabeled``.

Values are kept as written (``Spec.raw``): a string, or a list of strings where the value
holds ``;`` (``mean=0.5;0.5;0.5``). Empty items are dropped, so ``classes=cat;`` is a list of
one. Spaces around a value or an item are dropped. The component's factory signature then
types each value (``kdplug.registry.typed_options``): ``classes=no;yes`` stays
``['no', 'yes']`` for a ``list[str]`` option and ``01`` stays ``'01'`` for a ``str`` one.

Quoting: a REF, a value or one item of a list written in double quotes is taken verbatim,
so it may hold ``,`` ``=`` ``;`` ``:`` and spaces: ``disk:"/data/my,dir"``,
``checkpoint="/m/a=b.pt"``, ``classes="a;b";c`` (two classes: ``a;b`` and ``c``). Inside the
quotes ``\"`` is a quote and ``\\`` a backslash; any other backslash there is an error. A
``"`` elsewhere is an error. Outside quotes a backslash is an ordinary character.
Quoted text is never turned into None or guessed. ``quote(text)`` writes a REF or value so
that it parses back verbatim (``quote_list`` a list).

``Spec.options`` holds the same values guessed the old way (int, float, bool, None or str,
quoted text stays str), for code that reads options without a factory signature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kdplug.errors import UsageError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUOTE = '"'
_ESCAPED = (_QUOTE, "\\")
_SYNTAX = set(',;="')

Raw = str | list[str]


class Quoted(str):
    """Text that was written in double quotes: taken verbatim, never guessed, never None."""


@dataclass(frozen=True)
class Spec:
    """A parsed spec string: ``raw`` as written, ``options`` guessed (see the module doc)."""

    name: str
    ref: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    raw: dict[str, Raw] | None = None

    def __str__(self) -> str:
        return self.text or self.name

    def plus(self, **values: Any) -> Spec:
        """This spec with options added from Python values (an engine's additions to a
        user's spec): written as text where the spec is text, so its factory types them."""
        added = ",".join(f"{key}={_written(v)}" for key, v in values.items())
        raw = None
        if self.raw is not None:
            raw = {**self.raw, **{key: _raw(v) for key, v in values.items()}}
        return Spec(self.name, self.ref, {**self.options, **values}, f"{self},{added}", raw)

    @classmethod
    def of(cls, name: str, ref: str | None = None, **options: Any) -> Spec:
        """A spec an engine builds from Python values: they reach the factory as they are
        (class names stay strings, paths stay paths), and ``text`` is how a user would write
        it, for run records and messages."""
        head = name if ref is None else f"{name}:{quote(ref)}"
        text = ",".join([head, *(f"{key}={_written(v)}" for key, v in options.items())])
        return cls(name, ref, dict(options), text)

    def without(self, *keys: str) -> Spec:
        """This spec less the options ``keys`` (e.g. the ones the data path handles)."""
        raw = None if self.raw is None else {k: v for k, v in self.raw.items() if k not in keys}
        options = {k: v for k, v in self.options.items() if k not in keys}
        return Spec(self.name, self.ref, options, self.text, raw)


def guess_value(text: Raw) -> Any:
    """The old rule: int, float, bool (true/yes/on, false/no/off), None (none/null), a list
    of those for a list, else the text (always the text where it was quoted)."""
    if isinstance(text, list):
        return [guess_value(item) for item in text]
    if isinstance(text, Quoted):
        return str(text)
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def quote(value: str) -> str:
    """``value`` written so that it parses back verbatim as a REF, a value or a list item:
    as it is where it can, else in double quotes with ``\\`` and ``"`` escaped."""
    text = str(value)
    if text and text == text.strip() and not _SYNTAX & set(text):
        return text
    escaped = text.replace("\\", "\\\\").replace(_QUOTE, "\\" + _QUOTE)
    return f"{_QUOTE}{escaped}{_QUOTE}"


def quote_list(values: list[str]) -> str:
    """``values`` as one option value that parses back as this list (of any length)."""
    joined = ";".join(quote(v) for v in values)
    return joined if len(values) > 1 else f"{joined};"


def _text(value: Any) -> str:
    """One option value (not a list) as a user would write it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _written(value: Any) -> str:
    """An option value as spec text that types back to ``value``."""
    if isinstance(value, list | tuple):
        return quote_list([_text(v) for v in value])
    return quote(_text(value))


def _raw(value: Any) -> Raw:
    """A Python value as ``Spec.raw`` holds what a user wrote (quoted, so never guessed)."""
    if isinstance(value, list | tuple):
        return [Quoted(_text(v)) for v in value]
    return Quoted(_text(value))


def _split(text: str, sep: str, spec: str, maxsplit: int = -1) -> list[str]:
    """``text`` cut at each ``sep`` outside double quotes; quotes stay in the parts."""
    parts, start, quoted, i = [], 0, False, 0
    while i < len(text):
        char = text[i]
        if quoted and char == "\\":
            i += 1
        elif char == _QUOTE:
            quoted = not quoted
        elif char == sep and not quoted and len(parts) != maxsplit:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quoted:
        raise UsageError(f"bad spec {spec!r}: a double quote is not closed")
    return [*parts, text[start:]]


def _unquote(part: str, spec: str) -> str:
    """One REF, value or item: its text, a ``Quoted`` when it was written in quotes."""
    token = part.strip()
    if _QUOTE not in token:
        return token
    if token.startswith(_QUOTE):
        chars, i = [], 1
        while i < len(token):
            char = token[i]
            if char == "\\":
                escaped = token[i + 1 : i + 2]
                if escaped not in _ESCAPED:
                    raise UsageError(
                        f"bad spec {spec!r}: unknown escape \\{escaped} in {token}; "
                        'inside double quotes write \\\\ for a backslash and \\" for a quote'
                    )
                chars.append(escaped)
                i += 2
            elif char == _QUOTE:
                if i == len(token) - 1:
                    return Quoted("".join(chars))
                break
            else:
                chars.append(char)
                i += 1
    raise UsageError(
        f"bad spec {spec!r}: {token!r}: a value holding a double quote must be quoted whole, "
        'e.g. key="a\\"b"'
    )


def _value(text: str, spec: str) -> Raw:
    """An option's text: one string, or a list of strings where it holds ``;``."""
    items = [_unquote(item, spec) for item in _split(text, ";", spec)]
    if len(items) == 1:
        return items[0]
    return [item for item in items if item or isinstance(item, Quoted)]


def parse_spec(text: str) -> Spec:
    """Parse ``NAME[:REF][,key=value,...]``; raise UsageError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty spec: expected NAME[:REF][,key=value,...]")
    text = text.strip()
    cut = min((i for i in (text.find(":"), text.find(",")) if i >= 0), default=len(text))
    name, rest = text[:cut], text[cut:]
    if not _NAME.match(name):
        raise UsageError(f"bad spec {text!r}: {name!r} is not a component name")
    ref = None
    parts = _split(rest[1:], ",", text) if rest else []
    if rest.startswith(":") and parts and len(_split(parts[0], "=", text, 1)) == 1:
        ref = str(_unquote(parts.pop(0), text))
        if not ref:
            raise UsageError(f"bad spec {text!r}: empty reference after ':'")
    raw: dict[str, Raw] = {}
    options: dict[str, Any] = {}
    for part in parts:
        key, *value = _split(part, "=", text, 1)
        key = key.strip()
        if not value or not _KEY.match(key):
            raise UsageError(f"bad spec {text!r}: expected key=value, got {part!r}")
        if key in raw:
            raise UsageError(f"bad spec {text!r}: option {key!r} given twice")
        parsed = _value(value[0], text)
        raw[key], options[key] = parsed, guess_value(parsed)
    return Spec(name=name, ref=ref, options=options, text=text, raw=raw)
