"""``--config FILE``: a YAML (or JSON) file whose keys are a command's options.

One implementation for every command: the file is read before the other options (an eager
option), its keys checked against the command's own options (every unknown key named in
one line, with the nearest known key), each value typed as its flag would type it, and the
result handed to click as the command's defaults, so that a flag given on the command line
wins and a required option may come from the file. The file also counts among the run's
inputs (``kdplug.outputs.run_inputs``), so that ``--out`` never overwrites it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from kdplug.errors import UsageError
from kdplug.registry import closest

# the parameters a config file cannot set: the file itself, --help, and the launcher's
# process count (a child process reads the same file: it would launch again)
COMMAND_LINE_ONLY = ("config_file", "help", "nproc_per_node")
_PATH_KEY = "kdplug.config_file"


def read_mapping(path: str) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"config file {path} is not readable YAML ({exc})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys to values")
    return values


def key_names(command: click.Command) -> dict[str, click.Parameter]:
    """Each key a config file may use (a flag's name with ``_`` for ``-``, or the
    parameter's own name) -> the command's parameter it sets."""
    names: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name in COMMAND_LINE_ONLY or not isinstance(param, click.Option):
            continue
        for opt in param.opts:
            names[opt.lstrip("-").replace("-", "_")] = param
        if param.name and not param.name.endswith("_"):
            names.setdefault(param.name, param)
    return names


def config_values(path: str, ctx: click.Context) -> dict[str, Any]:
    """The file's values keyed by the command's parameter names, typed as on the command
    line; a UsageError naming the file for unknown keys (all of them) or a wrong value."""
    where = f"config file {path}"
    names = key_names(ctx.command)
    mapping = read_mapping(path)
    unknown = [str(key) for key in mapping if str(key).replace("-", "_") not in names]
    if unknown:
        only = {flag(p) for p in ctx.command.params if p.name in COMMAND_LINE_ONLY}
        raise UsageError(f"{where}: {unknown_keys(unknown, names, only)}")
    values: dict[str, Any] = {}
    for key, value in mapping.items():
        param = names[str(key).replace("-", "_")]
        if value is None:
            continue  # "key:" with no value: as if not given
        if param.name in values:
            raise UsageError(f"{where}: {key!r} sets --{flag(param)} a second time")
        values[param.name] = typed(param, str(key), value, where, ctx)
    return values


def unknown_keys(unknown: list[str], names: dict[str, click.Parameter], only: set[str]) -> str:
    """``unknown key 'epoch' (did you mean 'epochs'?); known: ...`` for every unknown key
    (``only``: the command's flags a file cannot set)."""
    known = sorted({flag(param) for param in names.values()})
    named = []
    for key in unknown:
        dashed = key.replace("_", "-")
        close = closest(dashed, known)
        if dashed in only:
            named.append(f"{key!r} (command line only)")
        else:
            named.append(f"{key!r}" + (f" (did you mean {close!r}?)" if close else ""))
    noun = "key" if len(unknown) == 1 else "keys"
    return f"unknown {noun} {', '.join(named)}; known: {', '.join(known)}"


def flag(param: click.Parameter) -> str:
    """A parameter's long flag without its dashes (``batch-size``)."""
    longs = [opt for opt in param.opts if opt.startswith("--")]
    return (longs or param.opts)[0].lstrip("-")


def typed(param: click.Parameter, key: str, value: Any, where: str, ctx: click.Context) -> Any:
    """``value`` as the option's type makes it; a list for a repeatable option."""
    if getattr(param, "multiple", False):
        items = value if isinstance(value, list) else [value]
        return [_typed_one(param, key, item, where, ctx) for item in items]
    return _typed_one(param, key, value, where, ctx)


def _typed_one(param: click.Parameter, key: str, value: Any, where: str, ctx: click.Context) -> Any:
    """One value: a flag's true/false, else a string (or a number) the type converts."""
    if getattr(param, "is_bool_flag", False):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) and getattr(param, "_flag_needs_value", False):
        # an option whose value may be left out (distill's --augment): true is the flag alone
        return param.flag_value if value else None
    kind = param.type.name
    number = isinstance(param.type, click.types.IntParamType | click.types.FloatParamType)
    scalar = isinstance(value, str) or (
        number and isinstance(value, int | float) and not isinstance(value, bool)
    )
    if not scalar:
        wanted = "a number" if number else "a string"
        raise UsageError(f"{where}: {key} must be {wanted} ({kind}), got {value!r}")
    try:
        return param.type.convert(value, param, ctx)
    except click.BadParameter as exc:
        raise UsageError(f"{where}: {key}: {exc.message}") from None


def _load(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    if path is None or ctx.resilient_parsing:
        return
    from kdplug.outputs import run_inputs

    ctx.meta[_PATH_KEY] = path
    ctx.default_map = {**(ctx.default_map or {}), **config_values(path, ctx)}
    # on the root context: closed when the command ends, and also when an option after
    # --config fails to parse (the command's own context is then never closed)
    ctx.find_root().with_resource(run_inputs(path))


def config_option(command: Callable) -> Callable:
    """The ``--config FILE`` option (put it under ``@click.command``)."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load,
        metavar="FILE",
        help="YAML or JSON file whose keys are this command's options (batch-size or "
        "batch_size); flags given on the command line win.",
    )(command)


def config_path(ctx: click.Context) -> str | None:
    """The ``--config`` file of this command, or None."""
    return ctx.meta.get(_PATH_KEY)


def given(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a user set, on the command line or in the ``--config`` file."""
    sources = (ParameterSource.COMMANDLINE, ParameterSource.DEFAULT_MAP)
    return {name: v for name, v in params.items() if ctx.get_parameter_source(name) in sources}
