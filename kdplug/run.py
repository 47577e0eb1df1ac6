"""``Run``: what the engines hand to event hooks (``on_fit_start``, ``on_epoch_end``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdplug.errors import UsageError

TENSORBOARD_PLUGIN = "tensorboard"  # plugins/kdplug_tensorboard, which reads options["tensorboard"]


@dataclass
class Run:
    """One run of an engine: its resolved ``config``, its ``out`` directory and a ``state``
    dict the engine keeps current (for ``distill``: ``epoch``, ``epochs``, ``best_accuracy``,
    ``best_epoch``, ``history``). ``options``: how the run is run, settings that are not in
    ``config`` because they do not change what it computes (``device``, ``tensorboard``, ...);
    integrations read theirs there. Hooks read it; they must not change it."""

    config: dict[str, Any]
    out: Path
    state: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def check_tensorboard() -> None:
    """``--tensorboard DIR`` needs the tensorboard package (the extra) and the plugin that
    writes the event files: one line saying which is missing, before the run starts."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError(
            "--tensorboard needs the tensorboard package: pip install 'kdplug[tensorboard]'"
        )
    from kdplug.plugins import get_manager

    plugin = get_manager().plugins.get(TENSORBOARD_PLUGIN)
    if plugin is None or plugin.error:
        why = plugin.error if plugin is not None else "not loaded"
        raise UsageError(
            f"--tensorboard needs the plugin {TENSORBOARD_PLUGIN!r} (kdplug_tensorboard): {why}"
        )
