"""Spec strings: NAME[:REF][,key=value,...]."""

import pytest

from kdplug import UsageError, parse_spec


@pytest.mark.parametrize(
    "text, name, ref, options",
    [
        (
            "timm:resnet18,checkpoint=t.safetensors",
            "timm",
            "resnet18",
            {"checkpoint": "t.safetensors"},
        ),
        ("kd,T=4", "kd", None, {"T": 4}),
        ("kd:T=4,standardize=true", "kd", None, {"T": 4, "standardize": True}),
        ("disk:data/unlabeled", "disk", "data/unlabeled", {}),
        ("mean", "mean", None, {}),
        ("threshold,tau=0.9", "threshold", None, {"tau": 0.9}),
        ("weighted,weights=0.5;0.3;0.2", "weighted", None, {"weights": [0.5, 0.3, 0.2]}),
        (
            "hf:user/name,split=train,config=none",
            "hf",
            "user/name",
            {"split": "train", "config": None},
        ),
        ("x:ref,name=off,n=-3,f=1e-3", "x", "ref", {"name": False, "n": -3, "f": 1e-3}),
    ],
)
def test_parse(text, name, ref, options):
    spec = parse_spec(text)
    assert (spec.name, spec.ref, spec.options) == (name, ref, options)
    assert str(spec) == text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty spec"),
        ("timm:", "empty reference"),
        ("kd,T", "expected key=value"),
        ("kd,T=1,T=2", "given twice"),
        ("9lives:x", "not a component name"),
        ("kd,=3", "expected key=value"),
    ],
)
def test_bad_specs(text, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse_spec(text)
