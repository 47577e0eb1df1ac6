"""``kdplug label``: pseudo-label a dataset with one or more teachers."""

from __future__ import annotations

import sys
from typing import Any

import click

from kdplug import distributed
from kdplug.cli.config_file import config_option
from kdplug.cli.options import (
    allow_code_option,
    allow_pickle_option,
    batch_size_option,
    calibration_option,
    classes_option,
    config_from,
    device_option,
    nproc_option,
    teachers_option,
    tensorboard_option,
)


@click.command("label")
@teachers_option()
@click.option("--data", required=True, metavar="DATA", help="The data to label (a DATA spec).")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Output dataset directory."
)
@click.option(
    "--combiner",
    default=None,
    metavar="SPEC",
    help="How the teachers are combined into one soft label (see `kdplug list combiners`); "
    "default auto with --calibration-data, else mean.",
)
@click.option(
    "--calibration-data",
    default=None,
    metavar="DATA",
    help="Labeled rows to fit a fitted combiner (auto) on before labeling.",
)
@click.option(
    "--generator",
    default="threshold,floor=0.25",
    show_default=True,
    metavar="SPEC",
    help="Label generator, e.g. threshold,tau=0.9 or threshold,accuracy=0.98 (picked on "
    "labeled rows); the default keeps every class's most confident quarter "
    "(see `kdplug list label-generators`).",
)
@calibration_option
@batch_size_option
@device_option
@click.option("--resume", is_flag=True, help="Continue an interrupted run in OUT.")
@click.option("--overwrite", is_flag=True, help="Replace whatever OUT holds.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=8192,
    show_default=True,
    help="Rows per shard (the unit written to disk and skipped on --resume).",
)
@click.option("--with-inputs", is_flag=True, help="Copy DATA's input columns into OUT.")
@click.option(
    "--probs",
    default="auto",
    show_default=True,
    metavar="full|topk=K|none|auto",
    help="How each row's soft label is written: all C probabilities, the top K, or none. "
    "auto: the generator's top-k if it has one, else full up to 100 classes and topk=10 above.",
)
@click.option(
    "--eval-labels",
    default=None,
    metavar="DATA",
    help="True labels, row for row, to measure the labels against (default: DATA's own).",
)
@classes_option("Class names of the run (default: DATA's).")
@allow_pickle_option
@allow_code_option
@click.option(
    "--skip-bad-rows",
    is_flag=True,
    help="Reject rows where a teacher gives NaN/Inf (counted in the report) instead of failing.",
)
@config_option
@tensorboard_option
@nproc_option
def label_command(nproc_per_node: int | None, **params: Any) -> None:
    """Label DATA with the teachers; write OUT as a dataset with report.json and report.png."""
    from kdplug.engines.label import LabelConfig, run_label

    if nproc_per_node is not None:
        sys.exit(distributed.launch(nproc_per_node, sys.argv[1:]))
    config = config_from(LabelConfig, params)
    with distributed.session(config.device):
        report = run_label(config)
        if distributed.is_main():
            click.echo(summary(report, config.out))


def summary(report: dict, out: str) -> str:
    """One or two lines: rows, accepted, coverage and (with true labels) accuracy."""
    line = (
        f"labeled {report['rows']} rows: {report['accepted']} accepted "
        f"(coverage {report['coverage']:.1%}) -> {out}"
    )
    if report["accepted"] == 0:
        line += "\nno row was accepted: relax the generator (e.g. threshold,tau=0.8)"
    else:
        line += empty_classes_line(report)
    evaluation = report.get("eval")
    if evaluation and evaluation["accuracy_accepted"] is not None:
        line += (
            f"\naccuracy of accepted labels {evaluation['accuracy_accepted']:.2%} "
            f"on {evaluation['accepted_labeled_rows']} rows with true labels; "
            + all_rows_text(evaluation)
        )
        fit = report["generator"].get("fit")
        if fit and fit.get("on") == "DATA" and not report.get("eval_labels"):
            line += " (the generator was fitted on these rows: not a held-out measure)"
    return line


def empty_classes_line(report: dict) -> str:
    """A line naming the classes no row was accepted for ("" when there are none)."""
    empty = report.get("empty_classes") or []
    if not empty:
        return ""
    shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    predicted = report.get("predicted_per_class", {})
    rows = sum(predicted.get(name, 0) for name in empty)
    line = f"\nno row accepted for {len(empty)} of {len(report['classes'])} classes: {shown}"
    if not rows:
        return line + " (no row is predicted as them)"
    line += f" ({rows} rows are predicted as them"
    if not report["generator"]["options"].get("floor"):
        line += "; threshold,floor=0.25 keeps each class's most confident quarter"
    return line + ")"


def all_rows_text(evaluation: dict) -> str:
    """The accuracy of every row's class, and how many rows have none (unanswered)."""
    if evaluation["accuracy_all"] is None:
        return "no row answered"
    unanswered = evaluation.get("unanswered_labeled_rows", 0)
    if not unanswered:
        return f"all rows {evaluation['accuracy_all']:.2%}"
    return f"answered rows {evaluation['accuracy_all']:.2%} ({unanswered} not answered)"


COMMANDS = [label_command]
