"""The ``kdplug`` command line: a click group filled by the core and by plugins.

Modules here import no torch, timm or scikit-learn at import time; each command imports
the engine it runs inside its function, so ``kdplug --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from kdplug import __version__
from kdplug.errors import KdplugError


class KdplugGroup(click.Group):
    """A click group that prints kdplug's errors as one line with their exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KdplugError as exc:
            if os.environ.get("KDPLUG_DEBUG"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from kdplug.plugins import get_manager

    click.echo(f"kdplug {__version__}")
    for name, info in sorted(get_manager().plugins.items()):
        state = " (failed to load)" if info.error else ""
        click.echo(f"  {name} {info.version or '?'}{state}")
    ctx.exit()


@click.group(cls=KdplugGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show kdplug's and each plugin's version.",
)
def cli() -> None:
    """kdplug: distill many teachers into one small student, and pseudo-label data.

    Components are named by spec strings NAME[:REF][,key=value,...], e.g.
    timm:resnet18,checkpoint=t.safetensors. See `kdplug list teachers`.
    """


def _setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("kdplug: %(levelname)s: %(message)s"))
    logger = logging.getLogger("kdplug")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def build_cli() -> click.Group:
    """Attach the core commands (each module here lists its COMMANDS) and the plugins'."""
    import importlib
    import pkgutil

    from kdplug.plugins import get_manager

    for module in pkgutil.iter_modules(__path__):
        imported = importlib.import_module(f"{__name__}.{module.name}")
        for command in getattr(imported, "COMMANDS", ()):
            cli.add_command(command)
    get_manager().add_commands(cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``kdplug`` script and of ``python -m kdplug``."""
    _setup_logging()
    # kdplug shows its own progress bars; datasets' per-save bars would drown them
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        group = build_cli()
    except KdplugError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    group.main(args=argv, prog_name="kdplug")
