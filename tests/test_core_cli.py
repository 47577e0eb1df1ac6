"""The CLI: fast start-up, plugins/list output, one-line errors, install/uninstall."""

import json
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import kdplug
from kdplug.cli import KdplugGroup
from kdplug.plugins import create
from tests.conftest import ROOT, run_cli

HEAVY = ("torch", "timm", "sklearn", "datasets")
PROBE = """
import sys
from kdplug.cli import main
sys.argv = ["kdplug", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"], ["--version"]])
def test_light_commands_do_not_import_heavy_libraries(args):
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY:"), result.stdout[-300:]


def test_version_lists_plugins():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"kdplug {kdplug.__version__}\n")
    assert "  datasets " in result.stdout


def test_list_kind_table_and_json():
    table = run_cli("list", "datasets")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["name", "plugin", "description"]
    rows = json.loads(run_cli("list", "datasets", "--json").stdout)
    assert {"name": "sklearn", "plugin": "datasets"}.items() <= next(
        r for r in rows if r["name"] == "sklearn"
    ).items()


def test_bad_kind_is_a_usage_error():
    result = run_cli("list", "teacher")
    assert result.returncode == 2 and "Invalid value" in result.stderr


def make_cli():
    @click.group(cls=KdplugGroup)
    def group():
        pass

    @group.command()
    @click.argument("spec")
    def build(spec):
        create("datasets", spec)

    return group


@pytest.mark.parametrize(
    "spec, message",
    [
        ("skelarn:digits", "Error: unknown dataset 'skelarn'; did you mean 'sklearn'?"),
        ("sklearn:digits,=1", "Error: bad spec 'sklearn:digits,=1': expected key=value"),
        ("disk:/no/such/dir", "Error: disk: no such file or directory: /no/such/dir"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(spec, message):
    result = CliRunner().invoke(make_cli(), ["build", spec])
    assert result.exit_code == 2
    assert result.output.splitlines()[0].startswith(message)
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_install_and_uninstall_use_this_interpreters_pip(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    from kdplug.cli.plugins import install_command, uninstall_command

    runner = CliRunner()
    assert runner.invoke(install_command, ["-U", "kdplug-x", "--no-deps"]).exit_code == 0
    assert runner.invoke(uninstall_command, ["-y", "kdplug-x"]).exit_code == 0
    assert calls == [
        [sys.executable, "-m", "pip", "install", "--upgrade", "kdplug-x", "--no-deps"],
        [sys.executable, "-m", "pip", "uninstall", "-y", "kdplug-x"],
    ]


def test_example_plugin_installs_and_shows_up(tmp_path):
    target = tmp_path / "site"
    install = run_cli(
        "install",
        "--no-build-isolation",
        "--no-deps",
        "--quiet",
        "--target",
        str(target),
        str(ROOT / "examples" / "kdplug-example-plugin"),
    )
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": str(target)}
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=env).stdout)}
    assert plugins["example"]["distribution"] == "kdplug-example-plugin"
    assert plugins["example"]["components"] == {"teachers": ["centroid"], "datasets": ["blobs"]}
    teachers = run_cli("list", "teachers", env=env)
    assert any(line.split()[:2] == ["centroid", "example"] for line in teachers.stdout.splitlines())
    script = (
        "import numpy as np, torch\n"
        "from kdplug.data import load_data, batches\n"
        "from kdplug.plugins import create\n"
        "src = load_data('blobs:90,classes=3,features=6')\n"
        "x, y, _ = next(iter(batches(src, 60)))\n"
        "cent = np.stack([x[y == c].mean(0).numpy() for c in range(3)])\n"
        f"np.savez(r'{tmp_path}/c.npz', centroids=cent, classes=np.array(src.classes))\n"
        f"t = create('teachers', r'centroid:{tmp_path}/c.npz')\n"
        "print((t(x).argmax(1) == y).float().mean().item(), t.classes)\n"
    )
    used = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert used.returncode == 0, used.stderr
    accuracy, classes = used.stdout.split(" ", 1)
    assert float(accuracy) > 0.9 and "blob0" in classes
