"""The whole plugin contract: every hook a kdplug plugin can implement.

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

    A Teacher is any callable ``teacher(x) -> logits`` taking a float32 batch (images
    ``[B, C, H, W]`` in ``[0, 1]``, tabular ``[B, D]``) and returning float32 logits
    ``[B, num_classes]``. Optional attributes: ``classes`` (label names in output order),
    ``fingerprint`` (a hash of the files it was loaded from).

    :param register: Call ``register(name, factory)`` once per teacher source.
    """


@hookspec
def register_students(register: Register) -> None:
    """Register student builders: ``factory(ref, num_classes, in_chans, **options)``.

    The factory returns a ``torch.nn.Module`` mapping ``[B, in_chans, H, W]`` to logits.

    :param register: Call ``register(name, factory)`` once per student builder.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register loss strategies: ``factory(**options) -> LossStrategy``.

    A LossStrategy is called as ``loss(student_logits [B, C], target [B, C], labels [B])``
    with ``target`` the combined teacher probabilities at ``loss.temperature`` and labels
    ``-1`` where unknown; it returns a scalar tensor. See docs/plugins.md for its attributes.

    :param register: Call ``register(name, factory)`` once per loss strategy.
    """


@hookspec
def register_combiners(register: Register) -> None:
    """Register multi-teacher combiners: ``factory(**options) -> Combiner``.

    A Combiner is called as ``combiner(logits [K, B, C], known [K, C], labels [B],
    temperature)`` and returns ``(weights [K, B], target [B, C])``: per-sample teacher
    weights summing to 1 and the combined soft target. Optional methods ``fit`` and
    ``predict``: see docs/plugins.md.

    :param register: Call ``register(name, factory)`` once per combiner.
    """


@hookspec
def register_label_generators(register: Register) -> None:
    """Register pseudo-label generators: ``factory(**options) -> LabelGenerator``.

    A LabelGenerator is called as ``generator(target [N, C], teacher_probs [K, N, C],
    known [K, C])`` on all rows at once and returns a ``kdplug.Labels``.

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
