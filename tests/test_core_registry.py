"""Registries: names, did-you-mean, option checking, plugin errors named."""

import pytest

import kdplug
from kdplug.errors import PluginError, UsageError
from kdplug.registry import Registry


def make_combiner(alpha: float = 1.0, hard: bool = False, name: str = "x"):
    """A combiner for tests."""
    return ("combiner", alpha, hard, name)


def make_teacher(ref: str, scale: int = 1):
    """A teacher for tests."""
    return ("teacher", ref, scale)


def broken(ref: str):
    """A factory with a bug."""
    raise ZeroDivisionError("oops")


@pytest.fixture
def combiners():
    registry = Registry("combiners")
    registry.add("mean", make_combiner, "plug-a")
    return registry


def test_create_with_options_and_coercion(combiners):
    assert combiners.create("mean,alpha=2,hard=true") == ("combiner", 2.0, True, "x")
    assert isinstance(combiners.create("mean,alpha=2")[1], float)
    assert combiners.create("mean,name=7")[3] == "7"


def test_unknown_name_suggests(combiners):
    with pytest.raises(UsageError, match=r"unknown combiner 'maen'; did you mean 'mean'\?"):
        combiners.create("maen")


def test_unknown_option_lists_accepted(combiners):
    with pytest.raises(UsageError, match=r"unknown option 'beta' \(accepted: alpha, hard, name\)"):
        combiners.create("mean,beta=1")


@pytest.mark.parametrize(
    "spec, fragment", [("mean,hard=3", "true or false"), ("mean,alpha=abc", "must be float")]
)
def test_wrong_option_type(combiners, spec, fragment):
    with pytest.raises(UsageError, match=fragment):
        combiners.create(spec)


def test_reference_rules(combiners):
    with pytest.raises(UsageError, match="takes no reference"):
        combiners.create("mean:thing")
    teachers = Registry("teachers")
    teachers.add("t", make_teacher, "plug-a")
    assert teachers.create("t:model.bin,scale=3") == ("teacher", "model.bin", 3)
    with pytest.raises(UsageError, match=r"needs a reference: t:REF"):
        teachers.create("t,scale=3")


def test_duplicate_name_names_both_plugins(combiners):
    with pytest.raises(PluginError, match="'plug-a' and plugin 'plug-b'"):
        combiners.add("mean", make_combiner, "plug-b")


def test_duplicate_name_says_how_to_choose(combiners):
    with pytest.raises(PluginError, match=r"\(KDPLUG_BLOCK_PLUGINS=NAME skips the one you"):
        combiners.add("mean", make_combiner, "plug-b")


def test_factory_bug_names_plugin_and_component():
    teachers = Registry("teachers")
    teachers.add("bad", broken, "buggy-plugin")
    with pytest.raises(PluginError, match="plugin 'buggy-plugin' failed to build teacher 'bad'"):
        teachers.create("bad:x")


def test_usage_errors_from_factories_pass_through():
    def strict(ref: str):
        raise kdplug.UsageError("strict: no such file")

    teachers = Registry("teachers")
    teachers.add("strict", strict, "p")
    with pytest.raises(UsageError, match="^strict: no such file$"):
        teachers.create("strict:x")


def test_description_is_first_docstring_line(combiners):
    assert combiners.get("mean").description == "A combiner for tests."


def test_a_factory_calling_sys_exit_is_a_plugin_error():
    def quits(ref: str):
        raise SystemExit(0)

    teachers = Registry("teachers")
    teachers.add("quits", quits, "exiting-plugin")
    with pytest.raises(PluginError) as caught:
        teachers.create("quits:x")
    assert str(caught.value) == (
        "plugin 'exiting-plugin' failed to build teacher 'quits': sys.exit(0)"
    )
