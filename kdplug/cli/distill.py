"""``kdplug distill``: train a timm student from teachers (or from labels alone)."""

from __future__ import annotations

import sys

import click

from kdplug import distributed
from kdplug.cli.config_file import config_option, config_path, given
from kdplug.cli.options import (
    allow_code_option,
    allow_pickle_option,
    calibration_option,
    nproc_option,
    teachers_option,
    tensorboard_option,
)
from kdplug.cli.training import training_options


@click.command("distill")
@teachers_option(required=False)
@click.option(
    "--store", metavar="STORE", help="A teacher store (kdplug cache) instead of --teacher."
)
@click.option(
    "--student", metavar="SPEC", help="The student, e.g. timm:resnet18 (tabular: tabular:mlp)."
)
@click.option("--train", metavar="DATA", help="Labeled training data (a DATA spec).")
@click.option("--unlabeled", metavar="DATA", help="Unlabeled data: teachers' targets only.")
@click.option("--val", metavar="DATA", help="Labeled validation data (picks the best epoch).")
@click.option("--out", metavar="DIR", help="Run directory (student/, metrics, checkpoint).")
@click.option("--loss", metavar="SPEC", help="Loss strategy (default kd; ce = labels only).")
@click.option(
    "--combiner",
    metavar="SPEC",
    help="Multi-teacher combiner (default auto, fitted on the labeled --train rows, or on "
    "--calibration-data).",
)
@click.option(
    "--calibration-data",
    metavar="DATA",
    help="Labeled rows the teachers were not trained on: auto and T=auto fit on them "
    "instead of the --train rows.",
)
@click.option("--epochs", type=int, help="Epochs (default 10).")
@click.option("--batch-size", type=int, help="Rows per batch (default 128).")
@click.option("--lr", type=float, help="Peak learning rate (default 1e-3).")
@training_options
@click.option(
    "--device", metavar="auto|cpu|cuda|mps", help="Device; cuda:N picks a GPU (default auto)."
)
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a different run already in --out.")
@click.option(
    "--keep", metavar="best|last", help="The student kept: best by val accuracy, or last."
)
@click.option("--ema", is_flag=True, help="Keep an EMA of the weights; validate and save it.")
@click.option(
    "--augment",
    is_flag=False,
    flag_value="default",
    metavar="[KEY=VALUE,...]",
    help="timm training augmentation (alone: timm's defaults), e.g. "
    "'auto_augment=rand-m9-mstd0.5,mixup=0.2'.",
)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the student.")
@click.option(
    "--skip-bad-rows", is_flag=True, help="Drop rows where a teacher gives NaN/Inf; count them."
)
@click.option("--workers", type=int, help="Data loader workers (default: by data size).")
@click.option(
    "--log-interval",
    type=int,
    help="Steps between progress lines when stderr is not a terminal (default 50).",
)
@tensorboard_option
@calibration_option
@allow_pickle_option
@allow_code_option
@config_option
@nproc_option
@click.pass_context
def distill_command(ctx: click.Context, **flags) -> None:
    """Distill one or more teachers into a small student on labeled (+ unlabeled) data.

    Images train a timm student (timm:ARCH); tabular data (feature columns) trains the
    MLP tabular:mlp. A student of the other kind than --train's is refused.

    \b
    kdplug distill --teacher timm:resnet50,checkpoint=t.safetensors \\
        --student timm:resnet10t --train disk:data/train --unlabeled disk:data/raw \\
        --val disk:data/val --out runs/r10t --epochs 20
    """
    from kdplug.engines.distill import DistillConfig, distill

    nproc = flags.pop("nproc_per_node")
    if nproc is not None:
        sys.exit(distributed.launch(nproc, sys.argv[1:]))
    values = given(ctx, flags)  # on the command line or in --config FILE
    if "compile_" in values:
        values["compile"] = values.pop("compile_")
    if "teachers" in values:
        values["teachers"] = list(values["teachers"])
    config_file = config_path(ctx)
    source = f"config file {config_file}" if config_file else "distill"
    config = DistillConfig.from_mapping(values, source)
    with distributed.session(config.device):
        summary = distill(config)
        if not distributed.is_main():
            return
    best = summary["best_val_accuracy"]
    result = f"student written to {summary['student']}"
    if best is not None:
        result += f" (val accuracy: best {best:.4f} at epoch {summary['best_epoch']}, kept "
        result += f"{summary['kept']})"
    click.echo(result)


COMMANDS = [distill_command]
