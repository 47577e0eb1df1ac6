"""The plugin manager: entry points, failure isolation, env switches, event hooks."""

import inspect
import json
import sys
import textwrap

import click
import pluggy
import pytest

import kdplug
from kdplug import hookspecs
from kdplug.errors import PluginError
from kdplug.plugins import PluginManager
from kdplug.registry import KINDS
from tests.conftest import run_cli
from tests.test_core_docs_and_testing import hook_names


def fake_distribution(root, dist, module, source, ep_name=None):
    """Write an installed-looking distribution (dist-info + module) under ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[kdplug]\n{ep_name or dist} = {module}\n")


GOOD = """
    import kdplug

    def shout(ref: str, volume: int = 1):
        '''A teacher that shouts.'''
        return ref * volume

    @kdplug.hookimpl
    def register_teachers(register):
        register("shout", shout)
"""
BROKEN_IMPORT = "raise RuntimeError('cannot import me')\n"
BROKEN_HOOK = """
    import kdplug

    @kdplug.hookimpl
    def register_losses(register):
        raise ValueError('bad registration')
"""
MISSPELLED = """
    import kdplug

    @kdplug.hookimpl
    def register_teacher(register):
        pass
"""
DUPLICATE = """
    import kdplug

    @kdplug.hookimpl
    def register_datasets(register):
        register("disk", lambda ref: None)
"""


@pytest.fixture
def site(tmp_path):
    fake_distribution(tmp_path, "kdplug-good", "kdplug_good", GOOD, "good")
    fake_distribution(tmp_path, "kdplug-broken", "kdplug_broken", BROKEN_IMPORT, "broken")
    fake_distribution(tmp_path, "kdplug-badhook", "kdplug_badhook", BROKEN_HOOK, "badhook")
    fake_distribution(tmp_path, "kdplug-typo", "kdplug_typo", MISSPELLED, "typo")
    fake_distribution(tmp_path, "kdplug-dup", "kdplug_dup", DUPLICATE, "dup")
    return {"PYTHONPATH": str(tmp_path)}


def plugins_json(env, **extra):
    result = run_cli("plugins", "--json", env={**env, **extra})
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}, result.stderr


def test_first_party_plugins_are_listed():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert {
        "datasets",
        "timm",
        "torch",
        "sklearn",
        "losses",
        "combiners",
        "label-generators",
    } <= set(plugins)
    assert plugins["datasets"]["distribution"] == "kdplug"
    assert "sklearn" in plugins["datasets"]["components"]["datasets"]
    assert "register_datasets" in plugins["datasets"]["hooks"]


def test_broken_plugins_are_isolated_and_reported(site):
    plugins, stderr = plugins_json(site)
    assert plugins["good"]["error"] is None
    assert plugins["good"]["components"] == {"teachers": ["shout"]}
    assert plugins["good"]["version"] == "1.2.3"
    assert "cannot import me" in plugins["broken"]["error"]
    assert "bad registration" in plugins["badhook"]["error"]
    assert "register_teacher" in plugins["typo"]["error"]
    assert "'datasets' and plugin 'dup'" in plugins["dup"]["error"]
    assert plugins["datasets"]["error"] is None  # first-party wins the name
    assert "plugin 'broken' failed to load" in stderr
    listed = run_cli("list", "teachers", "--json", env=site)
    assert "shout" in [c["name"] for c in json.loads(listed.stdout)]


def test_strict_mode_reraises(site):
    result = run_cli("plugins", env={**site, "KDPLUG_STRICT_PLUGINS": "1"})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Error: plugin" in result.stderr


@pytest.mark.parametrize(
    "extra, expect_good",
    [
        ({"KDPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"}, False),
        ({"KDPLUG_LOAD_PLUGINS": "good"}, True),
        ({"KDPLUG_LOAD_PLUGINS": "kdplug-broken"}, False),
        ({"KDPLUG_BLOCK_PLUGINS": "good,broken"}, False),
    ],
)
def test_environment_switches(site, extra, expect_good):
    plugins, _ = plugins_json(site, **extra)
    assert ("good" in plugins) is expect_good
    assert "datasets" in plugins  # first-party plugins load unless blocked
    if extra.get("KDPLUG_LOAD_PLUGINS") == "kdplug-broken":
        assert set(plugins) & {"good", "badhook", "typo", "dup"} == set()


def test_blocking_a_first_party_plugin():
    plugins, _ = plugins_json({}, KDPLUG_BLOCK_PLUGINS="label-generators")
    assert "label-generators" not in plugins and "datasets" in plugins


def test_event_hooks_reach_plugins_and_failures_are_isolated(caplog):
    seen = []

    class Listener:
        @kdplug.hookimpl
        def on_epoch_end(self, run, epoch, metrics):
            seen.append((run, epoch, metrics["loss"]))

        @kdplug.hookimpl
        def on_fit_end(self, run, summary):
            seen.append(("end", summary))

    class Faulty:
        @kdplug.hookimpl
        def on_epoch_end(self, epoch):
            raise RuntimeError("listener bug")

        @kdplug.hookimpl
        def on_fit_start(self, run):
            seen.append(("start", run))

        @kdplug.hookimpl
        def on_labels_written(self, run, path, report):
            seen.append(("labels", path, report["rows"]))

    manager = PluginManager()
    manager.add(Listener(), "listener")
    manager.add(Faulty(), "faulty")
    manager.notify("on_fit_start", run="r")
    manager.notify("on_epoch_end", run="r", epoch=3, metrics={"loss": 0.5})
    manager.notify("on_fit_end", run="r", summary={"best": 1})
    manager.notify("on_labels_written", run="r", path="out", report={"rows": 7})
    assert ("r", 3, 0.5) in seen and ("end", {"best": 1}) in seen
    assert ("start", "r") in seen and ("labels", "out", 7) in seen
    assert "plugin 'faulty' raised in on_epoch_end" in caplog.text


def test_register_commands_hook_adds_a_command(tmp_path):
    source = """
        import click
        import kdplug

        @kdplug.hookimpl
        def register_commands(cli):
            @cli.command()
            @click.argument("name")
            def hello(name):
                '''Say hello.'''
                click.echo(f"hello {name}")
    """
    fake_distribution(tmp_path, "kdplug-hello", "kdplug_hello", source, "hello")
    result = run_cli("hello", "world", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout == "hello world\n"


def test_first_party_plugins_register_again_after_their_submodules_are_imported():
    """A submodule named like a factory (logits.py beside def logits) replaces the factory
    on the package once imported, and every plugin manager built later refuses the plugin."""
    import importlib
    import pkgutil

    first_party = PluginManager()
    first_party.load_entry_points()
    names = [n for n, info in first_party.plugins.items() if info.distribution == "kdplug"]
    assert len(names) >= 8
    for name in names:
        package = importlib.import_module(first_party.pm.get_plugin(name).__name__)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
    again = PluginManager()
    again.load_entry_points()
    assert {n: again.plugins[n].error for n in names} == dict.fromkeys(names)


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist, module, source, ep_name)``: a fake distribution this process's
    entry-point scan finds, for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = []

    def install_one(dist, module, source, ep_name=None):
        fake_distribution(tmp_path, dist, module, source, ep_name)
        modules.append(module)

    yield install_one
    for module in modules:
        sys.modules.pop(module, None)


def loaded() -> PluginManager:
    manager = PluginManager()
    manager.load_entry_points()
    return manager


EXITS_AT_IMPORT = "import sys\nsys.exit(0)\n"
EXITS_IN_REGISTER = """
    import sys
    import kdplug

    @kdplug.hookimpl
    def register_teachers(register):
        sys.exit(3)
"""
EXITS_LATER = """
    import sys
    import kdplug

    def quits(ref: str):
        '''A teacher that quits.'''
        sys.exit(0)

    @kdplug.hookimpl
    def register_teachers(register):
        register("quits", quits)

    @kdplug.hookimpl
    def on_labels_written(run, path, report):
        sys.exit(0)
"""


def test_a_plugin_calling_sys_exit_is_reported_by_name(install, caplog):
    install("kdplug-exit1", "kdplug_exit_import", EXITS_AT_IMPORT, "exit-import")
    install("kdplug-exit2", "kdplug_exit_register", EXITS_IN_REGISTER, "exit-register")
    install("kdplug-exit3", "kdplug_exit_later", EXITS_LATER, "exit-later")
    manager = loaded()
    assert manager.plugins["exit-import"].error == "import failed: sys.exit(0)"
    assert manager.plugins["exit-register"].error == "register_teachers failed: sys.exit(3)"
    assert "plugin 'exit-import' failed to load and is skipped: import failed: sys.exit(0)" in (
        caplog.text
    )
    with pytest.raises(PluginError) as caught:
        manager.create("teachers", "quits:x")
    assert str(caught.value) == "plugin 'exit-later' failed to build teacher 'quits': sys.exit(0)"
    manager.notify("on_labels_written", run="r", path="p", report={})
    assert "plugin 'exit-later' raised in on_labels_written: sys.exit(0)" in caplog.text


def test_a_listener_failing_in_any_way_leaves_the_run_alone(caplog):
    class Listener:
        @kdplug.hookimpl
        def on_fit_end(self, run, summary):
            raise kdplug.UsageError("listener: no such dashboard")

        @kdplug.hookimpl
        def on_epoch_end(self, epoch):
            sys.exit(2)

    manager = PluginManager()
    manager.add(Listener(), "listener")
    manager.notify("on_epoch_end", run="r", epoch=1, metrics={})
    manager.notify("on_fit_end", run="r", summary={})
    assert "plugin 'listener' raised in on_epoch_end: sys.exit(2)" in caplog.text
    assert (
        "plugin 'listener' raised in on_fit_end: UsageError: listener: no such dashboard"
        in caplog.text
    )


EVIL_DATASETS = """
    import kdplug

    def disk(ref: str):
        '''Not kdplug's disk.'''
        return ref

    @kdplug.hookimpl
    def register_datasets(register):
        register("disk", disk)
"""


def test_a_plugin_named_like_a_first_party_one_is_reported_and_can_be_chosen(
    install, monkeypatch, caplog
):
    install("kdplug-evil", "kdplug_evil_datasets", EVIL_DATASETS, "datasets")
    manager = loaded()
    assert manager.plugins["datasets"].distribution == "kdplug"
    assert manager.plugins["kdplug-evil:datasets"].error == (
        "plugin 'datasets' of 'kdplug' has the same name and loads instead; "
        "KDPLUG_BLOCK_PLUGINS=kdplug:datasets loads this one, "
        "KDPLUG_BLOCK_PLUGINS=kdplug-evil:datasets keeps kdplug:datasets without this warning"
    )
    assert "plugin 'kdplug-evil:datasets' failed to load and is skipped" in caplog.text

    monkeypatch.setenv("KDPLUG_BLOCK_PLUGINS", "kdplug:datasets")
    chosen = loaded()
    assert chosen.plugins["datasets"].distribution == "kdplug-evil"
    assert chosen.registries["datasets"].names() == ["disk"]
    assert chosen.create("datasets", "disk:x") == "x"
    assert chosen.plugins["timm"].error is None  # the other first-party plugins stay

    caplog.clear()
    monkeypatch.setenv("KDPLUG_BLOCK_PLUGINS", "kdplug-evil")
    quiet = loaded()
    assert quiet.plugins["datasets"].distribution == "kdplug" and "kdplug-evil" not in caplog.text


def test_a_component_name_clash_skips_the_later_plugin_naming_both(install, monkeypatch, caplog):
    install("kdplug-dupdisk", "kdplug_dup_disk", EVIL_DATASETS, "dupdisk")
    assert loaded().registries["datasets"].get("disk").plugin == "datasets"
    assert (
        "plugin 'dupdisk' failed to load and is skipped: register_datasets failed: PluginError: "
        "datasets name 'disk' is registered by both plugin 'datasets' and plugin 'dupdisk' "
        "(KDPLUG_BLOCK_PLUGINS=NAME skips the one you do not want)"
    ) in caplog.text
    monkeypatch.setenv("KDPLUG_BLOCK_PLUGINS", "datasets")
    assert loaded().registries["datasets"].get("disk").plugin == "dupdisk"


def test_a_plugin_command_never_replaces_one_already_there(caplog):
    group = click.Group("kdplug")

    @group.command("label")
    def core_label():
        """kdplug's own."""

    def adds(*names):
        class Plugin:
            @kdplug.hookimpl
            def register_commands(self, cli):
                for name in names:
                    cli.add_command(click.Command(name, help=f"from {names}"))

        return Plugin()

    class Quitter:
        @kdplug.hookimpl
        def register_commands(self, cli):
            sys.exit(1)

    manager = PluginManager()
    manager.add(adds("hello"), "first")
    manager.add(adds("label", "hello", "extra"), "greedy")
    manager.add(Quitter(), "quitter")
    manager.add_commands(group)
    assert group.commands["label"] is core_label
    assert group.commands["hello"].help == "from ('hello',)"
    assert group.commands["extra"].help == "from ('label', 'hello', 'extra')"
    assert "plugin 'greedy' tried to replace kdplug's command 'label'; kdplug's is kept" in (
        caplog.text
    )
    assert (
        "plugin 'greedy' tried to replace the command 'hello' of plugin 'first', which is kept; "
        "KDPLUG_BLOCK_PLUGINS=first gives it to plugin 'greedy'"
    ) in caplog.text
    assert manager.plugins["quitter"].error == "register_commands failed: sys.exit(1)"


class Wraps:
    """A ``wrapper=True`` listener: records before and after the others."""

    def __init__(self, seen):
        self.seen = seen

    @kdplug.hookimpl(wrapper=True)
    def on_epoch_end(self, run, epoch, metrics):
        self.seen.append("before")
        result = yield
        self.seen.append("after")
        return result


class First:
    def __init__(self, seen):
        self.seen = seen

    @kdplug.hookimpl(tryfirst=True)
    def on_epoch_end(self, epoch):
        self.seen.append("tryfirst")


class Plain:
    def __init__(self, seen):
        self.seen = seen

    @kdplug.hookimpl
    def on_epoch_end(self, metrics):
        self.seen.append("plain")


def listeners(seen):
    return [("wraps", Wraps(seen)), ("plain", Plain(seen)), ("first", First(seen))]


def test_event_hooks_run_in_pluggys_order_with_wrappers_and_tryfirst():
    direct = []
    pm = pluggy.PluginManager("kdplug")
    pm.add_hookspecs(hookspecs)
    for name, plugin in listeners(direct):
        pm.register(plugin, name=name)
    pm.hook.on_epoch_end(run="r", epoch=1, metrics={})

    seen = []
    manager = PluginManager()
    for name, plugin in listeners(seen):
        manager.add(plugin, name)
    manager.notify("on_epoch_end", run="r", epoch=1, metrics={})
    assert seen == direct == ["before", "tryfirst", "plain", "after"]


def test_a_failing_listener_is_a_warning_and_the_wrapper_completes(caplog):
    class Faulty:
        @kdplug.hookimpl
        def on_epoch_end(self, epoch):
            raise RuntimeError(f"listener bug at epoch {epoch}")

    seen = []
    manager = PluginManager()
    for name, plugin in [*listeners(seen), ("faulty", Faulty())]:
        manager.add(plugin, name)
    manager.notify("on_epoch_end", run="r", epoch=4, metrics={})
    assert seen == ["before", "tryfirst", "plain", "after"]
    assert "plugin 'faulty' raised in on_epoch_end: RuntimeError: listener bug at epoch 4" in (
        caplog.text
    )


def fails_before(seen):
    raise kdplug.UsageError("no dashboard")
    yield


def fails_after(seen):
    seen.append("before")
    yield
    sys.exit(3)


def never_yields(seen):
    seen.append("before")
    return
    yield


def yields_twice(seen):
    yield
    yield


@pytest.mark.parametrize(
    "body, before, message",
    [
        (fails_before, [], "UsageError: no dashboard"),
        (fails_after, ["before"], "sys.exit(3)"),
        (never_yields, ["before"], "RuntimeError: wrapper on_epoch_end did not yield"),
        (yields_twice, [], "RuntimeError: wrapper on_epoch_end yielded twice"),
    ],
    ids=["raises-before", "exits-after", "never-yields", "yields-twice"],
)
def test_a_failing_wrapper_is_a_warning_and_the_others_run(caplog, body, before, message):
    seen = []

    class BadWrapper:
        @kdplug.hookimpl(wrapper=True)
        def on_epoch_end(self):
            return (yield from body(seen))

    manager = PluginManager()
    manager.add(BadWrapper(), "bad")
    for name, plugin in listeners(seen):
        manager.add(plugin, name)
    manager.notify("on_epoch_end", run="r", epoch=1, metrics={})
    assert seen == [*before, "before", "tryfirst", "plain", "after"]
    assert f"plugin 'bad' raised in on_epoch_end: {message}" in caplog.text


EVENTS = {
    "on_fit_start": {"run": "r"},
    "on_epoch_end": {"run": "r", "epoch": 1, "metrics": {"loss": 0.5}},
    "on_fit_end": {"run": "r", "summary": {"best": 1}},
    "on_labels_written": {"run": "r", "path": "out", "report": {"rows": 7}},
}


class EveryHook:
    """Implements every hook; records each call with the arguments it got."""

    def __init__(self):
        self.seen = {}

    def _record(self, hook, **kwargs):
        self.seen[hook] = kwargs

    @kdplug.hookimpl
    def register_commands(self, cli):
        cli.add_command(click.Command("every"))
        self._record("register_commands")

    @kdplug.hookimpl
    def on_fit_start(self, run):
        self._record("on_fit_start", run=run)

    @kdplug.hookimpl
    def on_epoch_end(self, run, epoch, metrics):
        self._record("on_epoch_end", run=run, epoch=epoch, metrics=metrics)

    @kdplug.hookimpl
    def on_fit_end(self, run, summary):
        self._record("on_fit_end", run=run, summary=summary)

    @kdplug.hookimpl
    def on_labels_written(self, run, path, report):
        self._record("on_labels_written", run=run, path=path, report=report)


def registers(hook, kind):
    """A ``hook`` implementation registering one component, ``every-KIND``."""

    def implementation(self, register):
        register(f"every-{kind}", lambda *args, **options: (kind, args, options))
        self._record(hook)

    return kdplug.hookimpl(implementation)


for _kind, (_hook, _, _) in KINDS.items():
    setattr(EveryHook, _hook, registers(_hook, _kind))


def test_every_hook_is_called_through_pluggy_on_its_plugin_alone():
    """pluggy's monitoring sees each hook call; a registry hook is called on the plugin
    being added only, so each component is attributed to its own plugin."""

    class Earlier(Plain):
        @kdplug.hookimpl
        def register_teachers(self, register):
            register("earlier", lambda ref: ref)

    calls = []
    manager = PluginManager()
    manager.add(Earlier([]), "earlier")
    manager.pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: calls.append((hook, [i.plugin_name for i in impls])),
        lambda outcome, hook, impls, kwargs: None,
    )
    every = EveryHook()
    info = manager.add(every, "every")
    group = click.Group("kdplug")
    manager.add_commands(group)
    for hook, kwargs in EVENTS.items():
        manager.notify(hook, **kwargs)

    assert sorted(every.seen) == hook_names(), "EveryHook must implement every hook"
    assert {hook: kwargs for hook, kwargs in every.seen.items() if kwargs} == EVENTS
    assert sorted(hook for hook, _ in calls) == hook_names()
    assert all(impls == ["every"] for hook, impls in calls if hook != "on_epoch_end")
    assert ("on_epoch_end", ["earlier", "every"]) in calls
    assert info.components == {kind: [f"every-{kind}"] for kind in KINDS}
    assert "every" in group.commands


def test_hook_arguments_are_typed():
    """Every hook argument has a type (no ``Any``); event hooks get a ``kdplug.Run``."""
    import typing

    for name in hook_names():
        spec = getattr(hookspecs, name)
        hints = typing.get_type_hints(spec, localns={"click": click})
        params = list(inspect.signature(spec).parameters)
        assert set(params) <= set(hints), name
        assert all(hints[p] is not typing.Any for p in params), name
        if name.startswith("on_"):
            assert hints["run"] is kdplug.Run, name


def test_a_wrapper_that_is_not_a_generator_is_refused_in_one_line(caplog):
    class NoYield:
        @kdplug.hookimpl(wrapper=True)
        def on_fit_end(self, run, summary):
            return None

    info = PluginManager().add(NoYield(), "noyield")
    assert info.error == (
        "invalid plugin: Plugin 'noyield' for hook 'on_fit_end'; "
        "hookimpl definition: on_fit_end(run, summary); "
        "Declared as wrapper=True or hookwrapper=True but function is not a generator function"
    )
    assert f"plugin 'noyield' failed to load and is skipped: {info.error}\n" in caplog.text
