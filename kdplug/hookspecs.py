"""The whole plugin contract: every hook a kdplug plugin can implement.

Registry hooks are called once, when the plugin manager first loads, each with a
``register(name, factory)`` callback. Event hooks are called by the engines while
they run; they return nothing and must not change the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("kdplug")
hookimpl = pluggy.HookimplMarker("kdplug")

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def register_teachers(register: Register) -> None:
    """Register teacher sources: ``factory(ref: str, **options) -> Teacher``.

    A Teacher is any callable ``teacher(x) -> logits`` taking a float32 batch (images
    ``[B, C, H, W]`` in ``[0, 1]``, tabular ``[B, D]``) and returning float32 logits
    ``[B, num_classes]``. Optional attributes: ``classes`` (label names in output order),
    ``fingerprint`` (a hash of the files it was loaded from).
    """


@hookspec
def register_students(register: Register) -> None:
    """Register student builders: ``factory(ref, num_classes, in_chans, **options)``.

    The factory returns a ``torch.nn.Module`` mapping ``[B, in_chans, H, W]`` to logits.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register loss strategies: ``factory(**options) -> LossStrategy``.

    A LossStrategy is called as ``loss(student_logits [B, C], target [B, C], labels [B])``
    with ``target`` the combined teacher probabilities at ``loss.temperature`` and labels
    ``-1`` where unknown; it returns a scalar tensor. See docs/plugins.md for its attributes.
    """


@hookspec
def register_combiners(register: Register) -> None:
    """Register multi-teacher combiners: ``factory(**options) -> Combiner``.

    A Combiner is called as ``combiner(logits [K, B, C], known [K, C], labels [B],
    temperature)`` and returns ``(weights [K, B], target [B, C])``: per-sample teacher
    weights summing to 1 and the combined soft target. Optional methods ``fit`` and
    ``predict``: see docs/plugins.md.
    """


@hookspec
def register_label_generators(register: Register) -> None:
    """Register pseudo-label generators: ``factory(**options) -> LabelGenerator``.

    A LabelGenerator is called as ``generator(target [N, C], teacher_probs [K, N, C],
    known [K, C])`` on all rows at once and returns a ``kdplug.Labels``.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register data sources: ``factory(ref: str, **options) -> datasets.Dataset``."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``kdplug`` click group ``cli``; called before the CLI parses."""


@hookspec
def on_fit_start(run: Any) -> None:
    """Called by ``distill`` once the student and teachers are built, before epoch 0.

    ``run`` is the ``kdplug.Run`` (its ``config``, ``out`` directory and ``state``).
    """


@hookspec
def on_epoch_end(run: Any, epoch: int, metrics: dict) -> None:
    """Called by ``distill`` after each epoch, with the line it writes to metrics.jsonl."""


@hookspec
def on_fit_end(run: Any, summary: dict) -> None:
    """Called by ``distill`` after the student is written, with summary.json's content."""


@hookspec
def on_labels_written(run: Any, path: str, report: dict) -> None:
    """Called by ``label`` after the labeled dataset and report.json are in place at ``path``."""
