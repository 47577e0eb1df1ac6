"""Spec values typed by the factory's signature, the quoting syntax, and self-train's specs."""

from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdplug.errors import UsageError
from kdplug.plugins import get_manager
from kdplug.registry import Registry, typed_options
from kdplug.spec import parse_spec, quote, quote_list

Names = str | int | list[str | int] | None


def typed(
    ref: str,
    classes: Names = None,
    name: str = "x",
    split: str | None = "train",
    flag: bool = False,
    n: int = 0,
    mean: float | list[float] | None = None,
    T: float | str = 2.0,
    pool: Literal["cv", "val"] = "cv",
):
    """A factory whose options cover the annotations kdplug converts text to."""
    return dict(locals())


def loose(ref, a=None, **options):
    """A factory without annotations, taking any option."""
    return {"a": a, **options}


@pytest.fixture
def teachers():
    registry = Registry("teachers")
    registry.add("typed", typed, "plug")
    registry.add("loose", loose, "plug")
    return registry


TYPED = {
    "classes=no;yes": {"classes": ["no", "yes"]},
    "classes=01;1": {"classes": ["01", "1"]},
    "classes=01": {"classes": "01"},
    "classes=off;": {"classes": ["off"]},
    "name=01": {"name": "01"},
    "name=none": {"name": "none"},
    "split=null": {"split": None},
    'split="none"': {"split": "none"},
    "flag=off,n=01": {"flag": False, "n": 1},
    "flag=1": {"flag": True},
    "mean=1e3": {"mean": 1000.0},
    "mean=0.5;1": {"mean": [0.5, 1.0]},
    "T=4": {"T": 4.0},
    "T=auto": {"T": "auto"},
    "pool=val": {"pool": "val"},
}


def test_values_are_typed_by_the_factory_signature(teachers):
    for options, expected in TYPED.items():
        built = teachers.create(f"typed:model.bin,{options}")
        got = {k: built[k] for k in expected}
        assert got == expected and repr(got) == repr(expected), options


def test_builtin_teachers_keep_class_names_verbatim(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((4, 2), dtype=np.float32))
    for classes in (["no", "yes"], ["01", "1"], ["true", "none"]):
        spec = f"logits:{tmp_path / 'z.npy'},classes={';'.join(classes)}"
        assert get_manager().create("teachers", spec).classes == classes


def test_wrong_text_is_one_line_in_one_style(teachers):
    cases = {
        "typed:m,n=1.5": "typed:m: option n='1.5' must be int",
        "typed:m,flag=maybe": "typed:m: option flag='maybe' must be true or false",
        "typed:m,mean=a;b": "typed:m: option mean='a;b' must be float or a list of float or none",
        "typed:m,mean=nan": (
            "typed:m: option mean='nan' must be float or a list of float or none (a finite number)"
        ),
        "typed:m,pool=train": "typed:m: option pool='train' must be cv or val",
        "typed:m,name=a;b": "typed:m: option name='a;b' must be str (quote a value holding \";\": "
        'name="a;b")',
    }
    for spec, message in cases.items():
        with pytest.raises(UsageError) as caught:
            teachers.create(spec)
        assert str(caught.value) == message
    with pytest.raises(UsageError, match=r"^threshold: option tau='inf' must be float"):
        get_manager().create("label-generators", "threshold,tau=inf")


def test_unannotated_options_keep_the_old_guess_and_quotes_keep_text(teachers):
    built = teachers.create('loose:m,a=01,b=no,c=1e3,d=none,e="01",f=x;"yes"')
    assert built == {"a": 1, "b": False, "c": 1000.0, "d": None, "e": "01", "f": ["x", "yes"]}


def test_typed_options_serves_specs_parsed_elsewhere():
    def describe(dataset, name, image_size: int | list[int] | None = None, image_column=None):
        """The data path's options, say."""

    spec = parse_spec("disk:d,image_size=32;24,image_column=01")
    options = typed_options(describe, spec.raw, str(spec), skip=2)
    assert options == {"image_size": [32, 24], "image_column": 1}
    with pytest.raises(UsageError, match=r"^disk:d,x=1: unknown option 'x' \(accepted: "):
        typed_options(describe, parse_spec("disk:d,x=1").raw, "disk:d,x=1", skip=2)


def test_quoted_refs_and_values_hold_the_separators():
    spec = parse_spec(r'disk:"/d/my,dir=x;y:z",split="a,b=c",classes="a;b";c;"q\"\\";""')
    assert spec.ref == "/d/my,dir=x;y:z"
    assert spec.raw == {"split": "a,b=c", "classes": ["a;b", "c", 'q"\\', ""]}
    assert parse_spec(r"disk:C:\data\x").ref == r"C:\data\x"  # unquoted: backslash is plain


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('disk:"/d/a,b', "a double quote is not closed"),
        ('x,k=ab"c', "a double quote is not closed"),
        (r'x,k="C:\data"', r"unknown escape \\d"),
        ('x,k="a"b', "must be quoted whole"),
    ],
)
def test_bad_quoting_is_a_usage_error(text, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse_spec(text)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.text(), max_size=4))
def test_quoted_text_parses_back_verbatim(value, items):
    assert parse_spec(f"x,k={quote(value)},j=1").raw["k"] == value
    if value:
        spec = parse_spec(f"disk:{quote(value)},k={quote(value)}")
        assert (spec.ref, spec.raw["k"]) == (value, value)
    assert parse_spec(f"x,k={quote_list(items)},j=1").raw["k"] == items


def test_self_train_specs_carry_class_names_and_paths(tmp_path):
    from kdplug.engines.self_train import write_targets
    from kdplug.spec import Spec
    from tests.test_self_train import labels_dataset

    folder = tmp_path / 'odd,dir=x;y "q"'
    folder.mkdir()
    classes = ["no", "yes", "01", "a;b"]
    labeled, _ = labels_dataset(tmp_path / "labels", np.eye(4, dtype=np.float32)[[1]], [True])
    target = write_targets(np.array([3, 0]), labeled, classes, folder / "t.npy")
    teacher = get_manager().create("teachers", target)
    assert teacher.classes == classes and teacher.array.shape == (3, 4)
    # what run.json records reads back as the same spec
    again = parse_spec(str(target))
    assert (again.ref, again.raw["classes"]) == (str(folder / "t.npy"), classes)
    assert parse_spec(str(Spec.of("disk", str(folder)))).ref == str(folder)


def test_spec_of_keeps_values_and_writes_text_that_parses_back():
    from kdplug.spec import Spec

    spec = Spec.of("kd", T=1.0, ce_weight=0.0, flag=False, classes=["01", "x,y"])
    assert spec.options == {"T": 1.0, "ce_weight": 0.0, "flag": False, "classes": ["01", "x,y"]}
    assert str(spec) == 'kd,T=1.0,ce_weight=0.0,flag=false,classes=01;"x,y"'
    assert parse_spec(str(spec)).raw["classes"] == ["01", "x,y"]
    assert (
        str(Spec.of("logits", "/a=b/t.npy", classes=["one"])) == 'logits:"/a=b/t.npy",classes=one;'
    )
