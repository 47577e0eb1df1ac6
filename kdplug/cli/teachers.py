"""``kdplug teachers calibrate`` and ``kdplug teachers report``: teachers on a labeled split."""

from __future__ import annotations

import json

import click

from kdplug.cli.config_file import config_option
from kdplug.cli.options import (
    allow_code_option,
    allow_pickle_option,
    batch_size_option,
    calibration_option,
    device_option,
    teachers_option,
)

data_option = click.option(
    "--data", required=True, metavar="DATA", help="A labeled DATA spec, e.g. disk:data/val."
)
skip_bad_rows_option = click.option(
    "--skip-bad-rows",
    is_flag=True,
    help="Drop (and count) rows where a teacher returns NaN/Inf instead of stopping.",
)


@click.group("teachers")
def teachers_group() -> None:
    """Calibrate teachers and judge them on labeled data."""


@teachers_group.command("calibrate")
@teachers_option()
@data_option
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="The calibration JSON to write (read by --calibration).",
)
@batch_size_option
@device_option
@skip_bad_rows_option
@allow_pickle_option
@allow_code_option
@config_option
def calibrate_command(
    teachers: tuple[str, ...],
    data: str,
    out: str,
    batch_size: int,
    device: str,
    skip_bad_rows: bool,
) -> None:
    """Fit one temperature per teacher on labeled DATA.

    Temperature scaling (Guo et al. 2017): one T per teacher minimizing the NLL of
    softmax(z / T); it never changes a teacher's argmax. Writes --out as JSON, keyed by
    spec and file hash, for --calibration.
    """
    from kdplug.device import pick_device
    from kdplug.engines.teachers import calibrate

    record = calibrate(teachers, data, out, batch_size, pick_device(device), skip_bad_rows)
    for entry in record["teachers"]:
        click.echo(
            f"{entry['spec']}: T={entry['temperature']:.3f}  "
            f"NLL {entry['nll_before']:.4f} -> {entry['nll_after']:.4f}  "
            f"ECE {entry['ece_before']:.4f} -> {entry['ece_after']:.4f}"
        )
    click.echo(f"wrote {out}")


@teachers_group.command("report")
@teachers_option()
@data_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for report.json and the PNG figures.",
)
@calibration_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out directory.")
@batch_size_option
@device_option
@skip_bad_rows_option
@allow_pickle_option
@allow_code_option
@config_option
def report_command(
    teachers: tuple[str, ...],
    data: str,
    out: str | None,
    calibration: str | None,
    as_json: bool,
    overwrite: bool,
    batch_size: int,
    device: str,
    skip_bad_rows: bool,
) -> None:
    """Judge teachers and their ensembles on labeled DATA.

    Per teacher: accuracy, NLL, ECE (15 bins) and pairwise agreement; per registered
    combiner: the ensemble's accuracy, NLL and ECE. With --calibration, each teacher's
    numbers before and after temperature scaling.
    """
    from kdplug.device import pick_device
    from kdplug.engines.teachers import format_report, report

    result = report(
        teachers,
        data,
        out,
        calibration,
        batch_size,
        pick_device(device),
        skip_bad_rows,
        overwrite,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_report(result))
        if out is not None:
            click.echo(f"\nwrote {out}/report.json and figures")


COMMANDS = [teachers_group]
