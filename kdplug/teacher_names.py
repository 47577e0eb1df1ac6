"""What tables, figures, logs and metrics call a teacher.

A teacher's name is its spec's ``name=`` option (an option of every teacher, taken off
before the plugin's factory sees the spec), else the name it gives itself
(``Teacher.name``: a store teacher, the name it was cached under), else the stem of the
file its spec names (``onnx:models/big.onnx`` is ``big``;
``timm:resnet50,checkpoint=mine.pt`` is ``mine``), else its REF, else its component's
name. Names shared by several teachers get ``-2``, ``-3``... in spec order. Runs still
record each teacher's spec text, which names its file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from kdplug.spec import Spec, parse_spec

NAME_OPTION = "name"


def as_spec(spec: str | Spec) -> Spec:
    return parse_spec(spec) if isinstance(spec, str) else spec


def given_name(spec: str | Spec) -> str | None:
    """The ``name=`` option of ``spec``, or None."""
    spec = as_spec(spec)
    value = spec.options.get(NAME_OPTION)
    return None if value is None else str(value).strip() or None


def ref_name(spec: str | Spec) -> str:
    """The stem of the file ``spec`` names: its REF when that is a path (it has a suffix or
    a folder), else its ``checkpoint=`` option (``timm:resnet50,checkpoint=mine.pt`` is
    ``mine``); else the REF, else the component's name."""
    spec = as_spec(spec)
    for text in (spec.ref, spec.options.get("checkpoint")):
        path = PurePath(str(text).rstrip("/\\")) if text else None
        if path is not None and path.stem and (path.suffix or len(path.parts) > 1):
            return path.stem
    return spec.ref or spec.name


def teacher_names(specs: Sequence[str | Spec], teachers: Sequence[Any] = ()) -> list[str]:
    """One name per teacher of ``specs`` (``teachers``: the built ones, for their own
    ``name``), distinct (see the module doc)."""
    built = list(teachers) or [None] * len(specs)
    names = [
        given_name(spec) or getattr(teacher, "name", None) or ref_name(spec)
        for spec, teacher in zip(specs, built)
    ]
    return distinct(names)


def distinct(names: Sequence[str]) -> list[str]:
    """``names`` with a repeated one suffixed ``-2``, ``-3``... from its second use on."""
    taken: set[str] = set()
    out = []
    for name in names:
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique)
        out.append(unique)
    return out
