"""Every hook is documented; the plugin-author fixtures work as documented."""

import re
from pathlib import Path

import kdplug
from kdplug import hookspecs
from tests.conftest import ROOT

PLUGINS_MD = (ROOT / "docs" / "plugins.md").read_text()


def hook_names():
    return [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "kdplug_spec")]


def test_every_hook_is_documented_under_its_signature():
    import inspect

    names = hook_names()
    assert len(names) == 11
    for name in names:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        heading = f"#### `{name}({params})`"
        assert heading in PLUGINS_MD, f"docs/plugins.md lacks {heading}"


def test_every_hook_has_a_docstring():
    """pytest style: when the hook is called, and a ``:param NAME:`` line per argument."""
    import inspect

    for name in hook_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert doc.strip(), name
        for param in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f":param {param}:" in doc, f"{name}'s docstring does not describe {param}"


def test_docs_example_fixtures(register_plugin, create_component, kdplug_manager):
    class Doubler:
        @kdplug.hookimpl
        def register_teachers(self, register):
            register("double", lambda ref, factor=2: lambda x: x * factor)

    info = register_plugin(Doubler(), "doubler")
    assert info.error is None and info.components == {"teachers": ["double"]}
    assert create_component("teachers", "double:anything,factor=3")(2) == 6
    assert "doubler" in kdplug_manager.plugins
    from kdplug.plugins import get_manager

    assert get_manager() is kdplug_manager


def test_register_plugin_reports_a_broken_plugin(register_plugin):
    class Broken:
        @kdplug.hookimpl
        def register_combiners(self, register):
            register("mean", lambda: None)  # taken by kdplug's own combiners plugin

    info = register_plugin(Broken(), "broken")
    assert re.search(r"'combiners' and plugin 'broken'", info.error)
    assert info.components == {}


def test_the_readme_maps_every_command_to_its_engine_file():
    from kdplug.cli import build_cli

    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `kdplug ")]
    for name in build_cli().commands:
        row = next((r for r in rows if f"`kdplug {name}" in r.split("|")[1]), None)
        assert row is not None, f"README's layout table has no row for `kdplug {name}`"
        files = re.findall(r"`(kdplug/[\w/]+\.py)`", row)
        assert files and all((ROOT / f).is_file() for f in files), row
    engines = {p.name for p in (ROOT / "kdplug" / "engines").glob("[!_]*.py")}
    assert engines == {Path(f).name for f in re.findall(r"kdplug/engines/\w+\.py", readme)}
