"""``Run``: what the engines hand to event hooks (``on_fit_start``, ``on_epoch_end``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """One run of an engine: its resolved ``config``, its ``out`` directory and a ``state``
    dict the engine keeps current (for ``distill``: ``epoch``, ``epochs``, ``best_accuracy``,
    ``best_epoch``, ``history``). Hooks read it; they must not change it."""

    config: dict[str, Any]
    out: Path
    state: dict[str, Any] = field(default_factory=dict)
