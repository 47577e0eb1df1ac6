"""Teachers are called by names a user recognizes (``name=``, else the file's stem), and
scikit-learn teachers say what they are fed (``scale=``) and list every untrusted type."""

from __future__ import annotations

import json
import logging

import pytest

from kdplug import UsageError
from kdplug.teacher_names import teacher_names
from tests.teacher_fixtures import digits_arrays


class Named:
    name = "cached-big"


def test_a_teacher_is_named_by_name_option_its_own_name_or_its_files_stem():
    specs = [
        "onnx:models/big.onnx",
        "onnx:models/big.onnx,name=Big one",
        "timm:resnet18",
        "timm:resnet50,checkpoint=runs/own/finetuned.safetensors",
        "torchscript:/very/long/path/to/the/teachers/folder/of/this/user/resnet50_a1.pt",
        "store:runs/store4,teacher=0,split=2",
        "mine",
    ]
    teachers = [None, None, None, None, None, Named(), None]
    assert teacher_names(specs, teachers) == [
        "big",
        "Big one",
        "resnet18",
        "finetuned",
        "resnet50_a1",
        "cached-big",
        "mine",
    ]


def test_teachers_with_the_same_name_are_told_apart_in_spec_order():
    specs = ["onnx:a/model.onnx", "onnx:b/model.onnx", "sklearn:c/model.skops", "x:model-2.pt"]
    assert teacher_names(specs) == ["model", "model-2", "model-3", "model-2-2"]


def logistic_files(tmp_path, digits_splits) -> list[str]:
    """Two skops logistic regressions fitted on the labeled digits, in two folders."""
    import skops.io

    from tests.teacher_fixtures import fit_logistic

    specs = []
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "lr.skops"
        skops.io.dump(fit_logistic(digits_splits["labeled"]), path)
        specs.append(f"sklearn:{path}")
    return specs


def test_name_option_reaches_tables_reports_and_figures_not_the_plugin(tmp_path, digits_splits):
    from click.testing import CliRunner

    from kdplug.cli import build_cli

    first, second = logistic_files(tmp_path, digits_splits)
    out = tmp_path / "report"
    args = ["teachers", "report", "--data", digits_splits["labeled"], "--out", str(out)]
    args += ["--teacher", first, "--teacher", second, "--teacher", f"{second},name=tuned"]
    result = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["teachers"]] == ["lr", "lr-2", "tuned"]
    assert [t["spec"] for t in report["teachers"]] == [first, second, f"{second},name=tuned"]
    table = [line.split()[:2] for line in result.output.splitlines()]
    assert ["0", "lr"] in table and ["1", "lr-2"] in table and ["2", "tuned"] in table
    recommended = next(line for line in result.output.splitlines() if "recommended:" in line)
    assert set(recommended.split("recommended: ")[1].split(" (")[0].split(", ")) <= {
        "lr",
        "lr-2",
        "tuned",
    }
    assert set(report["selection"]["recommended_specs"]) <= {first, second, f"{second},name=tuned"}


def test_the_label_report_and_a_store_keep_the_names(tmp_path, digits_splits):
    from kdplug.data import load_data
    from kdplug.engines.cache import CacheConfig, run_cache
    from kdplug.engines.label import LabelConfig, run_label
    from kdplug.store.producer import store_producer

    first, second = logistic_files(tmp_path, digits_splits)
    specs = [f"{first},name=left", second]
    report = run_label(
        LabelConfig(specs, digits_splits["labeled"], str(tmp_path / "l"), progress=False)
    )
    assert [(t["name"], t["spec"]) for t in report["teachers"]] == [
        ("left", specs[0]),
        ("lr", second),
    ]
    store = tmp_path / "store"
    run_cache(CacheConfig(specs, [digits_splits["labeled"]], str(store), progress=False))
    train = load_data(digits_splits["labeled"])
    producer = store_producer(str(store), train, None, train.classes)
    assert producer.names == ["left", "lr"] and producer.specs == specs
    again = run_label(
        LabelConfig(
            [f"store:{store},teacher=1"],
            digits_splits["labeled"],
            str(tmp_path / "s"),
            progress=False,
        )
    )
    assert again["teachers"][0]["name"] == "lr"  # the name it was cached under


def raw_pixels_model(tmp_path, digits_splits):
    """A GaussianNB fitted on the labeled digits at 0-16 (scikit-learn's own scale), saved
    with skops; kdplug feeds digits in [0, 1]."""
    import skops.io
    from sklearn.naive_bayes import GaussianNB

    x, y = digits_arrays(digits_splits["labeled"])
    rows = x.reshape(len(x), -1).numpy() * 16
    path = tmp_path / "nb.skops"
    skops.io.dump(GaussianNB(var_smoothing=1e-2).fit(rows, y.numpy()), path)
    return f"sklearn:{path}"


def accuracy(spec: str, data: str) -> float:
    from kdplug.data import load_data
    from kdplug.teachers import build_teacher_set

    source = load_data(data)
    x, y = digits_arrays(data)
    teacher_set = build_teacher_set([spec], source.classes, data=source)
    predicted = teacher_set(x).logits[0].argmax(1)
    return float((predicted == y).float().mean())


def test_a_scikit_learn_teacher_on_another_scale_is_warned_and_scale_fixes_it(
    tmp_path, digits_splits, caplog
):
    spec = raw_pixels_model(tmp_path, digits_splits)
    with caplog.at_level(logging.INFO, logger="kdplug"):
        wrong = accuracy(spec, digits_splits["test"])
    assert "is fed 64 features (image pixels in [0, 1]) times scale=1" in caplog.text
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "fitted on features of mean magnitude" in warning and "scale=" in warning
    suggested = float(warning.rsplit("scale=", 1)[1].rstrip(")"))
    assert 12 < suggested < 20  # the data's 0-16 against kdplug's [0, 1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdplug"):
        right = accuracy(f"{spec},scale=16", digits_splits["test"])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert right > 0.8 and right > wrong + 0.2


def test_scale_must_be_positive(tmp_path, digits_splits):
    spec = raw_pixels_model(tmp_path, digits_splits)
    with pytest.raises(UsageError, match="scale must be a finite number > 0, got 0"):
        accuracy(f"{spec},scale=0", digits_splits["test"])


def test_every_teacher_needing_untrusted_types_is_listed_in_one_error(tmp_path, digits_splits):
    import skops.io
    from sklearn.tree import DecisionTreeClassifier

    from kdplug.teachers import create_teachers

    x, y = digits_arrays(digits_splits["labeled"])
    specs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.skops"
        skops.io.dump(DecisionTreeClassifier(random_state=0).fit(x.reshape(150, -1), y), path)
        specs.append(f"sklearn:{path}")
    with pytest.raises(UsageError) as error:
        create_teachers(specs)
    message = str(error.value)
    assert message.startswith("2 teacher files need types skops does not trust by default")
    assert all(f"{spec} needs [" in message for spec in specs) and "\n" not in message
    trusted = [f"{spec},trusted=sklearn.tree._tree.Tree" for spec in specs]
    assert len(create_teachers(trusted)) == 2
    with pytest.raises(UsageError, match=r"a.skops: the file needs types .* add trusted="):
        create_teachers([specs[0], trusted[1]])  # one teacher: the one-teacher message
