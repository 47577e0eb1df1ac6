"""``kdplug self-train``: rounds of pseudo-labeling and noisy-student training."""

from __future__ import annotations

import click

from kdplug.cli.config_file import config_option
from kdplug.cli.options import (
    allow_code_option,
    allow_pickle_option,
    device_option,
    teachers_option,
)
from kdplug.cli.training import given_training, training_options


@click.command("self-train")
@teachers_option()
@click.option(
    "--student",
    required=True,
    metavar="SPEC",
    help="The student, e.g. timm:resnet18 (tabular: tabular:mlp).",
)
@click.option("--train", required=True, metavar="DATA", help="Labeled training rows (a DATA spec).")
@click.option("--unlabeled", required=True, metavar="DATA", help="Images to pseudo-label.")
@click.option(
    "--val",
    required=True,
    metavar="DATA",
    help="Labeled rows to score each round (and pick the best).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--generator",
    default=None,
    metavar="SPEC",
    help="Which pseudo-labels each round keeps (default: `kdplug label`'s; see "
    "`kdplug list label-generators`).",
)
@click.option(
    "--combiner",
    default="mean",
    show_default=True,
    metavar="SPEC",
    help="How the teachers' outputs are combined; one with a fit step (auto) is fitted "
    "on the --train rows each round.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Student epochs per round.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Rows per batch (distill's default; also the label step's).",
)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@training_options
@click.option(
    "--augment",
    default=None,
    metavar="[KEY=VALUE,...]",
    help="Input noise for the student, as for `kdplug distill --augment`.",
)
@click.option(
    "--drop-path",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Stochastic depth of the student (model noise).",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Each round's student replaces the teachers instead of joining them.",
)
@click.option(
    "--eval-labels",
    default=None,
    metavar="DATA",
    help="True labels of --unlabeled, row for row, to score each round's pseudo-labels "
    "(default: --unlabeled's own, if any).",
)
@device_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in OUT.")
@click.option("--overwrite", is_flag=True, help="Replace a different run in OUT.")
@allow_pickle_option
@allow_code_option
@config_option
def self_train_command(**options) -> None:
    """Noisy Student: teachers label, a noised student learns, the student joins the teachers.

    Images with a timm student, tabular data with tabular:mlp (other data is refused
    before any work). Round 0 trains the same student on the labeled rows
    alone; the best round by val accuracy is named at the end and in self_train.json.

    \b
    kdplug self-train --teacher sklearn:forest.skops --student timm:resnet10t \\
        --train disk:data/labeled --unlabeled disk:data/raw --val disk:data/val \\
        --rounds 3 --out runs/self
    """
    from kdplug.engines.self_train import SelfTrainConfig, best_line, run_self_train

    options["teachers"] = list(options["teachers"])
    options["training"] = given_training(options)  # to each round's distill
    summary = run_self_train(SelfTrainConfig(**options), echo=click.echo)
    click.echo("")
    click.echo("round  teachers  pseudo-labels  pseudo-label acc  student val acc")
    click.echo("-----  --------  -------------  ----------------  ---------------")
    for row in [summary["baseline"], *summary["rounds"]]:
        pseudo = row["pseudo_label_accuracy"]
        click.echo(
            f"{row['round']:>5}  {row['teachers']:>8}  {row['accepted']:>13}  "
            f"{'-' if pseudo is None else f'{pseudo:.4f}':>16}  "
            f"{row['val_accuracy']:>15.4f}"
        )
    click.echo(f"\n{best_line(summary)}")
    click.echo(f"rounds.png and self_train.json in {options['out']}")


COMMANDS = [self_train_command]
