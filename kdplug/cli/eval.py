"""``kdplug eval``: accuracy, NLL, ECE, per-class accuracy and confusion matrix of a student."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdplug.cli.config_file import config_option
from kdplug.cli.options import batch_size_option, device_option


@click.command("eval")
@click.option("--model", "model_dir", required=True, metavar="DIR", help="A student directory.")
@click.option("--data", required=True, metavar="DATA", help="Labeled data to evaluate on.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--out",
    metavar="DIR",
    help="Also write DIR/eval.json and DIR/confusion.png (the confusion matrix).",
)
@batch_size_option
@device_option
@click.option("--workers", type=click.IntRange(min=0), help="Data loader workers.")
@config_option
def eval_command(
    model_dir: str,
    data: str,
    as_json: bool,
    out: str | None,
    batch_size: int,
    device: str,
    workers: int | None,
) -> None:
    """Evaluate a student directory (DIR/student of a distill run) on labeled DATA.

    Images for a timm student, feature rows (as many features) for a tabular:mlp one.
    """
    from kdplug.engines.eval import evaluate_student, plot_confusion
    from kdplug.outputs import check_out, write_json

    if out:
        check_out(out)
    report = evaluate_student(model_dir, data, batch_size, device, workers)
    if out:
        write_json(Path(out) / "eval.json", report)
        plot_confusion(report["confusion_matrix"], report["classes"], Path(out) / "confusion.png")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"model     {report['model']}")
    click.echo(f"data      {report['data']} ({report['labeled_rows']} labeled rows)")
    click.echo(f"accuracy  {report['accuracy']:.4f}")
    click.echo(f"nll       {report['nll']:.4f}")
    click.echo(f"ece       {report['ece']:.4f}")
    click.echo("per-class accuracy:")
    for name, value in report["per_class_accuracy"].items():
        click.echo(f"  {name:<20} {'-' if value is None else f'{value:.4f}'}")
    if out:
        click.echo(f"wrote {Path(out) / 'eval.json'} and {Path(out) / 'confusion.png'}")


COMMANDS = [eval_command]
