"""Every hook a kdplug plugin can implement (with ``kdplug/components.py``, the shapes of the
components its register hooks register, the whole plugin contract).

Registry hooks are called once per plugin, on that plugin alone, when the plugin manager
adds it, each with a ``register(name, factory)`` callback that files the components under
that plugin. Event hooks (``EVENT_HOOKS``) are called by the engines while they run, on
every plugin at once, in pluggy's order (wrappers' code before ``yield``, ``tryfirst``
implementations, the others, ``trylast`` ones, wrappers' code after ``yield``); they
return nothing, must not change the run, and a failure in one is a warning naming its
plugin while the others still run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

from kdplug.run import Run

if TYPE_CHECKING:
    import click

hookspec = pluggy.HookspecMarker("kdplug")
hookimpl = pluggy.HookimplMarker("kdplug")

Register = Callable[[str, Callable[..., Any]], None]

EVENT_HOOKS = frozenset({"on_fit_start", "on_epoch_end", "on_fit_end", "on_labels_written"})


@hookspec
def register_teachers(register: Register) -> None:
    """Register teacher sources: ``factory(ref: str, **options) -> Teacher``.

    A ``kdplug.components.Teacher``: any callable ``teacher(x) -> logits [B, C_t]`` taking
    a float32 batch (images ``[B, C, H, W]`` in ``[0, 1]``, tabular ``[B, D]``); optional
    ``classes``, ``fingerprint``, ``uses_row_index``, ``num_rows``, ``data_fingerprint``
    (docs/plugins.md, "Teacher"). The engines call it once per batch.

    :param register: Call ``register(name, factory)`` once per teacher source.
    """


@hookspec
def register_students(register: Register) -> None:
    """Register student builders: ``factory(ref, num_classes, in_chans, **options) -> Student``.

    A ``kdplug.components.Student``: a ``torch.nn.Module`` mapping ``[B, in_chans, H, W]``
    to logits ``[B, num_classes]``; optional ``input_normalization`` and timm's
    ``pretrained_cfg`` (docs/plugins.md, "Student"). ``distill`` builds one per run.

    :param register: Call ``register(name, factory)`` once per student builder.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register loss strategies: ``factory(**options) -> LossStrategy``.

    A ``kdplug.components.LossStrategy``: ``loss(student_logits [B, C], target [B, C],
    labels [B]) -> scalar`` with ``target`` the combined teacher probabilities at
    ``loss.temperature``, labels ``-1`` where unknown; required ``temperature``,
    ``standardize``, ``uses_teachers``, ``ce_weight``, ``kd_weight``; optional ``fit`` (once,
    on the labeled rows, before training) and ``set_epoch`` (docs/plugins.md, "LossStrategy").

    :param register: Call ``register(name, factory)`` once per loss strategy.
    """


@hookspec
def register_combiners(register: Register) -> None:
    """Register multi-teacher combiners: ``factory(**options) -> Combiner``.

    A ``kdplug.components.Combiner``: ``combiner(logits [K, B, C], known [K, C], labels [B],
    temperature) -> (weights [K, B], target [B, C])``, per-row teacher weights summing to 1
    and the combined soft target, called on every batch; optional ``fit`` (once, on the
    labeled rows, before any row is combined) and ``predict`` (docs/plugins.md, "Combiner").

    :param register: Call ``register(name, factory)`` once per combiner.
    """


@hookspec
def register_label_generators(register: Register) -> None:
    """Register pseudo-label generators: ``factory(**options) -> LabelGenerator``.

    A ``kdplug.components.LabelGenerator``, contract version 2 (kdplug 0.2, streaming):
    ``prepare(shards)`` once, ``decide(rows) -> kdplug.Labels`` once per shard of rows, then
    ``summary()``; optional ``topk``, ``private``, ``teacher_probs`` and ``fit``. A version-1
    generator (``generator(target [N, C], teacher_probs [K, N, C], known [K, C])`` called
    once on all rows) still works, holding every row in memory (docs/plugins.md,
    "LabelGenerator").

    :param register: Call ``register(name, factory)`` once per label generator.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register data sources: ``factory(ref: str, **options) -> datasets.Dataset``.

    :param register: Call ``register(name, factory)`` once per data source.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``kdplug`` click group; called before the CLI parses.

    :param cli: The ``kdplug`` click group; add commands with ``@cli.command()``.
    """


@hookspec
def on_fit_start(run: Run) -> None:
    """Called by ``distill`` once the student and teachers are built, before epoch 0.

    :param run: The run: its resolved ``config``, ``out`` directory and ``state``.
    """


@hookspec
def on_epoch_end(run: Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Called by ``distill`` after each epoch, once its line is in ``metrics.jsonl``.

    :param run: The run; ``run.state`` is current (``epoch``, ``best_accuracy``, ...).
    :param epoch: The epoch just finished, counting from 1.
    :param metrics: The line written to ``metrics.jsonl`` (``loss``, ``val_accuracy``, ...).
    """


@hookspec
def on_fit_end(run: Run, summary: dict[str, Any]) -> None:
    """Called by ``distill`` after the student directory is written.

    :param run: The run.
    :param summary: The content of ``summary.json``.
    """


@hookspec
def on_labels_written(run: Run, path: str, report: dict[str, Any]) -> None:
    """Called by ``label`` once the labeled dataset and ``report.json`` are in place.

    :param run: The run.
    :param path: The output directory holding the dataset and ``report.json``.
    :param report: The content of ``report.json``.
    """
