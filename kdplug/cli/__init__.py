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
from kdplug.errors import KdplugError, describe

DEBUG_HINT = "set KDPLUG_DEBUG=1 for the traceback"
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class KdplugGroup(click.Group):
    """A click group that ends every failure in one line on stderr with its exit code:
    kdplug's errors with theirs, any other exception with 1 (``KDPLUG_DEBUG=1`` shows the
    traceback instead), Ctrl-C with 130. click's own exits and usage errors pass."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KdplugError as exc:
            if _debug():
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if _debug():
                import traceback

                traceback.print_exc()
            click.echo(f"Error: interrupted; {_how_to_continue(self, ctx)}", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as exc:
            if _debug():
                raise
            click.echo(f"Error: {_unexpected(exc)}", err=True)
            ctx.exit(1)


def _debug() -> bool:
    return bool(os.environ.get("KDPLUG_DEBUG"))


def _how_to_continue(group: click.Group, ctx: click.Context) -> str:
    """What to run after Ctrl-C: the same command with --resume where it has one."""
    name = ctx.invoked_subcommand
    command = group.get_command(ctx, name) if name else None
    if command is not None and any(p.name == "resume" for p in command.params):
        return "run the same command with --resume to continue"
    return "run the same command again"


def _unexpected(exc: Exception) -> str:
    """One line for an exception kdplug did not expect: its type and message, the file
    it names, and the plugin (or kdplug module) and line that raised it."""
    text = describe(exc)
    filename = getattr(exc, "filename", None)
    if filename and str(filename) not in text:
        text += f" ({filename})"
    try:
        return f"{text} (raised {_raised_in(exc)}; {DEBUG_HINT})"
    except Exception:  # the report of an error must not fail
        return f"{text} ({DEBUG_HINT})"


def _raised_in(exc: BaseException) -> str:
    """``in plugin 'P' at FILE:LINE`` for the innermost frame of a plugin in the traceback,
    else ``at FILE:LINE`` of the innermost kdplug frame (or the innermost frame)."""
    import traceback
    from pathlib import Path

    frames = traceback.extract_tb(exc.__traceback__)
    modules = _plugin_modules()
    for frame in reversed(frames):
        path = Path(frame.filename)
        for name, top in modules.items():
            if top in path.parts or path.stem == top:
                return f"in plugin {name!r} at {path.name}:{frame.lineno}"
    ours = [f for f in frames if "kdplug" in Path(f.filename).parts] or frames
    return f"at {Path(ours[-1].filename).name}:{ours[-1].lineno}"


def _plugin_modules() -> dict[str, str]:
    """Each loaded plugin's name -> the top-level package or module it is made of."""
    from kdplug.plugins import get_manager

    manager = get_manager()
    found = {}
    for name in manager.plugins:
        plugin = manager.pm.get_plugin(name)
        module = getattr(plugin, "__name__", None) or type(plugin).__module__
        top = module.split(".")[0] if isinstance(module, str) else ""
        if top and top not in ("kdplug", "builtins"):
            found[name] = top
    return found


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
