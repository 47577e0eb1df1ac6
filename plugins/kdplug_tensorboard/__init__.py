"""TensorBoard: distill's per-epoch metrics and label's report as TensorBoard scalars.

Off unless the run was given ``--tensorboard DIR`` (or ``tensorboard: DIR`` in its
``--config`` file): each hook reads ``run.options["tensorboard"]`` and returns at once
without it, importing nothing. With it, ``torch.utils.tensorboard.SummaryWriter`` writes
event files into DIR (needs the extra: ``pip install 'kdplug[tensorboard]'``). The tags are
in ``kdplug_tensorboard.scalars``; docs/integrations.md uses this plugin as the worked
example of an integration on the event hooks.
"""

from __future__ import annotations

from typing import Any

import kdplug

__version__ = kdplug.__version__

_writers: dict[str, Any] = {}  # a distill run's open writer, by its --tensorboard DIR


def _directory(run: kdplug.Run) -> str | None:
    return run.options.get("tensorboard")


def _writer(directory: str, purge_step: int | None = None) -> Any:
    """The open writer of ``directory`` (opened here, with ``purge_step`` when given)."""
    if directory not in _writers:
        from torch.utils.tensorboard import SummaryWriter

        _writers[directory] = SummaryWriter(log_dir=directory, purge_step=purge_step)
    return _writers[directory]


@kdplug.hookimpl
def on_fit_start(run: kdplug.Run) -> None:
    """Open the writer; a resumed run purges the events of the epochs it redoes."""
    directory = _directory(run)
    if directory is None:
        return
    from kdplug_tensorboard.scalars import config_text

    done = int(run.state.get("epoch", 0))
    if directory in _writers:  # left open by a run of this process that failed
        _writers.pop(directory).close()
    writer = _writer(directory, purge_step=done + 1 if done else None)
    writer.add_text("distill/config", config_text(run.config), global_step=done)
    writer.flush()


@kdplug.hookimpl
def on_epoch_end(run: kdplug.Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Every number of the epoch's metrics.jsonl line, at step ``epoch``."""
    directory = _directory(run)
    if directory is None:
        return
    from kdplug_tensorboard.scalars import epoch_scalars

    writer = _writer(directory)
    for tag, value in epoch_scalars(metrics).items():
        writer.add_scalar(tag, value, global_step=epoch)
    writer.flush()  # a run killed later keeps its finished epochs


@kdplug.hookimpl
def on_fit_end(run: kdplug.Run, summary: dict[str, Any]) -> None:
    """The summary's figures (best val accuracy, ...) at the last epoch; close the writer."""
    directory = _directory(run)
    if directory is None:
        return
    from kdplug_tensorboard.scalars import summary_scalars

    writer = _writer(directory)
    for tag, value in summary_scalars(summary).items():
        writer.add_scalar(tag, value, global_step=summary["epochs"])
    _writers.pop(directory).close()


@kdplug.hookimpl
def on_labels_written(run: kdplug.Run, path: str, report: dict[str, Any]) -> None:
    """The label report's numbers (step 0) and its accuracy-vs-coverage curve."""
    directory = _directory(run)
    if directory is None:
        return
    from torch.utils.tensorboard import SummaryWriter

    from kdplug_tensorboard.scalars import coverage_curve, label_scalars

    with SummaryWriter(log_dir=directory) as writer:
        for tag, value in label_scalars(report).items():
            writer.add_scalar(tag, value, global_step=0)
        for step, accuracy in coverage_curve(report):
            writer.add_scalar("label/eval/accuracy_vs_coverage", accuracy, global_step=step)
