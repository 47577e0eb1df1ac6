"""Click options shared by the commands that run teachers over data."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import click

from kdplug import distributed
from kdplug.device import DEVICES


def teachers_option(required: bool = True) -> Callable:
    return click.option(
        "--teacher",
        "teachers",
        multiple=True,
        required=required,
        metavar="SPEC",
        help="A teacher spec; repeat for several teachers.",
    )


def _opt_in(env: str) -> Callable:
    """A flag's callback that sets ``env`` for the command (the loaders and the command's
    child processes see it) and puts back what was there when the command ends, so that a
    caller running kdplug's CLI in its own process does not go on trusting files. The
    undo is on the root context: click closes it also when a later option fails to parse,
    which the subcommand's own context is not."""

    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            previous = os.environ.get(env)
            os.environ[env] = "1"
            ctx.find_root().call_on_close(lambda: _put_back(env, previous))
        return value

    return callback


def _put_back(env: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(env, None)
    else:
        os.environ[env] = value


allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    expose_value=False,
    callback=_opt_in("KDPLUG_ALLOW_PICKLE"),
    help="Trust pickle/joblib model files (they can run arbitrary code when loaded).",
)

allow_code_option = click.option(
    "--allow-code",
    is_flag=True,
    expose_value=False,
    callback=_opt_in("KDPLUG_ALLOW_CODE"),
    help="Trust model files that are programs: TorchScript, and torch.export programs that "
    "call more than torch's tensor operators (they can read and write files).",
)

calibration_option = click.option(
    "--calibration",
    type=click.Path(dir_okay=False),
    default=None,
    help="Temperatures from `kdplug teachers calibrate`, applied to the teachers.",
)

device_option = click.option(
    "--device", default="auto", show_default=True, help=f"One of {', '.join(DEVICES)} (or cuda:N)."
)

tensorboard_option = click.option(
    "--tensorboard",
    default=None,
    metavar="DIR",
    help="Write the run's metrics as TensorBoard event files into DIR (the tensorboard "
    "plugin; pip install 'kdplug[tensorboard]').",
)

batch_size_option = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Rows per batch.",
)

nproc_option = click.option(
    distributed.NPROC_FLAG,
    "nproc_per_node",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Run in N processes on this machine through torch's elastic launcher "
    "(like torchrun --nproc-per-node N; one process per GPU on CUDA).",
)


def _names(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise click.BadParameter(f"expected distinct names separated by commas, got {value!r}")
    return names


def classes_option(help: str) -> Callable:
    return click.option("--classes", callback=_names, default=None, metavar="A,B,C", help=help)


def config_from(cls: type, params: dict[str, Any]) -> Any:
    """An engine's config dataclass built from a command's parameters, which carry the
    config's field names (a repeated option's tuple becomes a list)."""
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field for the parameters {unknown}")
    return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()})
