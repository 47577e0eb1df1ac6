"""``kdplug export``: a student directory as an ONNX, TorchScript or torch.export file."""

from __future__ import annotations

import json

import click

from kdplug.cli.config_file import config_option

FORMATS = ("onnx", "torchscript", "export")  # kdplug.engines.export.FORMATS, without torch


@click.command("export")
@click.option("--model", "model_dir", required=True, metavar="DIR", help="A student directory.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    help="onnx (onnxruntime), torchscript (torch.jit.load) or export (torch.export.load); "
    "default: from the suffix of --out (.onnx, .ts, .pt2).",
)
@click.option("--out", required=True, metavar="FILE", help="The file to write.")
@click.option(
    "--data",
    metavar="DATA",
    help="Rows to check the export on (default: the val, else train, data of the distill "
    "run the student comes from, as its summary.json names it).",
)
@click.option(
    "--rows",
    type=click.IntRange(min=2),
    default=64,
    show_default=True,
    help="How many rows (the first ones) to check on.",
)
@config_option
def export_command(model_dir: str, fmt: str | None, out: str, data: str | None, rows: int) -> None:
    """Export a student directory as one file that takes [0, 1] images (any batch size,
    any image size; resize and normalization included) or feature rows and returns logits,
    checked by running it against the student on real rows. Prints a JSON summary."""
    from kdplug.engines.export import export_student
    from kdplug.outputs import check_out

    check_out(out, inputs=[model_dir, data], directory=False)
    summary = export_student(model_dir, fmt, out, data=data, rows=rows)
    click.echo(json.dumps(summary, indent=2))


COMMANDS = [export_command]
