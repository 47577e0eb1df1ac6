"""``kdplug plugins``, ``kdplug list KIND``, ``kdplug install`` and ``kdplug uninstall``."""

from __future__ import annotations

import json
import subprocess
import sys

import click

from kdplug.registry import KINDS


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins, their hooks, components and load errors."""
    from kdplug.plugins import get_manager

    infos = [info.as_dict() for _, info in sorted(get_manager().plugins.items())]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    rows = [("plugin", "version", "distribution", "components")]
    for info in infos:
        parts = [f"{kind}: {', '.join(names)}" for kind, names in info["components"].items()]
        if info["error"]:
            parts = [f"FAILED: {info['error']}"]
        rows.append(
            (
                info["name"],
                info["version"] or "?",
                info["distribution"] or "-",
                "; ".join(parts) or "(commands/events only)",
            )
        )
    click.echo(_table(rows))


@click.command("list")
@click.argument("kind", type=click.Choice(list(KINDS)))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(kind: str, as_json: bool) -> None:
    """List the registered components of one KIND, with the plugin providing each."""
    from kdplug.plugins import get_manager

    components = [
        {"name": c.name, "plugin": c.plugin, "description": c.description}
        for c in get_manager().registries[kind]
    ]
    if as_json:
        click.echo(json.dumps(components, indent=2))
        return
    rows = [("name", "plugin", "description")]
    rows += [(c["name"], c["plugin"], c["description"]) for c in components]
    click.echo(_table(rows))


def _pip(action: list[str], packages: tuple[str, ...]) -> None:
    command = [sys.executable, "-m", "pip", *action, *packages]
    code = subprocess.call(command)
    if code:
        raise click.exceptions.Exit(code)


@click.command("install", context_settings={"ignore_unknown_options": True})
@click.argument("packages", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade packages already installed.")
@click.option("-e", "--editable", is_flag=True, help="Install a local directory in editable mode.")
def install_command(packages: tuple[str, ...], upgrade: bool, editable: bool) -> None:
    """Install plugin PACKAGES with the pip of the Python kdplug runs in.

    Other pip options pass through, e.g. `kdplug install ./my-plugin --no-deps`.
    """
    if editable:
        packages = tuple(arg for package in packages for arg in ("-e", package))
    _pip(["install"] + (["--upgrade"] if upgrade else []), packages)


@click.command("uninstall", context_settings={"ignore_unknown_options": True})
@click.argument("packages", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def uninstall_command(packages: tuple[str, ...], yes: bool) -> None:
    """Uninstall plugin PACKAGES from the Python kdplug runs in."""
    _pip(["uninstall"] + (["-y"] if yes else []), packages)


def _table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(rows[0][-1]))
    return "\n".join(lines)


COMMANDS = [plugins_command, list_command, install_command, uninstall_command]
