"""``kdplug demo``: the end-to-end run on scikit-learn's bundled digits."""

from __future__ import annotations

import time

import click

from kdplug.cli.options import device_option


@click.command("demo")
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for the splits, teachers, labels and students (replaced).",
)
@click.option("--student", default="timm:test_resnet", show_default=True, metavar="SPEC")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--labeled",
    type=click.IntRange(min=20),
    default=150,
    show_default=True,
    help="Rows of digits that keep their labels.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
def demo_command(out: str, student: str, epochs: int, labeled: int, seed: int, device: str) -> None:
    """Teachers -> pseudo-labels -> distilled student on digits, with a result table."""
    from kdplug.engines.demo import DemoConfig, run_demo

    started = time.perf_counter()
    rows, labels = run_demo(
        DemoConfig(
            out=out, student=student, epochs=epochs, labeled=labeled, seed=seed, device=device
        ),
        echo=click.echo,
    )
    click.echo("")
    table = [("model", "kind", "test accuracy")]
    table += [(r["model"], r["kind"], f"{r['test_accuracy']:.4f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    table.insert(1, tuple("-" * w for w in widths))
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    accepted = labels["accuracy_accepted"]
    click.echo(
        f"\npseudo-labels: {labels['accepted']}/{labels['rows']} rows accepted "
        f"(coverage {labels['coverage']:.2f})"
        + (f", {accepted:.4f} of them correct" if accepted is not None else "")
    )
    click.echo(f"outputs in {out}/ ({time.perf_counter() - started:.0f} s)")


COMMANDS = [demo_command]
