"""Spec strings: ``NAME[:REF][,key=value,...]`` naming a component and its options.

Examples: ``timm:resnet18,checkpoint=t.safetensors``, ``kd,T=4``, ``kd:T=4``,
``disk:data/unlabeled``. Values become int, float, bool, None or str; a value holding
``;`` becomes a list (``mean=0.5;0.5;0.5``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kdplug.errors import UsageError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Spec:
    """A parsed spec string."""

    name: str
    ref: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.name


def parse_value(text: str) -> Any:
    """Turn an option value into int, float, bool, None, a list of those, or str."""
    if ";" in text:
        return [parse_value(part) for part in text.split(";") if part != ""]
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
    parts = rest[1:].split(",") if rest else []
    if rest.startswith(":") and parts and "=" not in parts[0]:
        ref = parts.pop(0)
        if not ref:
            raise UsageError(f"bad spec {text!r}: empty reference after ':'")
    options: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            raise UsageError(f"bad spec {text!r}: expected key=value, got {part!r}")
        if key in options:
            raise UsageError(f"bad spec {text!r}: option {key!r} given twice")
        options[key] = parse_value(value.strip())
    return Spec(name=name, ref=ref, options=options, text=text)
