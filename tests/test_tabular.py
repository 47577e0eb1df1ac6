"""The tabular student (``tabular:mlp``): distill, eval and self-train on feature rows."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import skops.io
import torch
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression

from kdplug.cli import build_cli
from tests.conftest import ROOT

FEATURES = ["a", "b", "c"]


def invoke(*args):
    """``kdplug ARGS`` through click's CliRunner (``result.stderr`` holds stderr alone)."""
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


def rows(count: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Three features on very different scales (a constant-free toy problem), 2 classes;
    ``shift`` moves every feature (data unlike the train rows)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 3)) * [1.0, 10.0, 100.0] + [0.0, 5.0, -50.0] + shift
    y = (x[:, 0] + (x[:, 1] - 5.0) / 10.0 > 0).astype(int)
    return x, y


def write_csv(path: Path, x: np.ndarray, y: np.ndarray | None, names=FEATURES) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*names, *(["label"] if y is not None else [])])
        for i, row in enumerate(x):
            writer.writerow([*row.tolist(), *([int(y[i])] if y is not None else [])])
    return f"csv:{path}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """60 labeled rows, 120 unlabeled rows (no label column), 60 val rows as CSV; a
    logistic regression fitted on the labeled rows (skops)."""
    root = tmp_path_factory.mktemp("tabular")
    x, y = rows(60, 0)
    xu, _ = rows(120, 1)
    xv, yv = rows(60, 2)
    path = root / "logreg.skops"
    skops.io.dump(LogisticRegression(max_iter=2000).fit(x, y), path)
    return {
        "train": write_csv(root / "train.csv", x, y),
        "unlabeled": write_csv(root / "unlabeled.csv", xu, None),
        "val": write_csv(root / "val.csv", xv, yv),
        "teacher": f"sklearn:{path}",
    }


def distill_args(tiny, out, *extra, student="tabular:mlp,widths=16,dropout=0.0"):
    return [
        *["distill", "--student", student, "--train", tiny["train"]],
        *["--out", out, "--epochs", "2", "--batch-size", "16", "--device", "cpu"],
        *extra,
    ]


@pytest.fixture(scope="module")
def distilled(tiny, tmp_path_factory) -> Path:
    """A distilled MLP: the teacher on the train and unlabeled rows, val rows to keep the
    best epoch."""
    out = tmp_path_factory.mktemp("runs") / "mlp"
    extra = ["--teacher", tiny["teacher"], "--unlabeled", tiny["unlabeled"], "--val", tiny["val"]]
    result = invoke(*distill_args(tiny, out, *extra))
    assert result.exit_code == 0, result.output
    return out


def test_distill_on_csv_rows_writes_a_student_that_eval_scores(distilled, tiny):
    from kdplug.model_dir import load_classifier

    summary = json.loads((distilled / "summary.json").read_text())
    assert summary["student_architecture"] == "mlp"
    assert summary["data"]["unlabeled"]["rows"] == 120
    config = json.loads((distilled / "student" / "config.json").read_text())
    assert config["architecture"] == "mlp" and config["label_names"] == ["0", "1"]
    assert (config["student"], config["data_kind"]) == ("tabular", "tabular")
    assert config["feature_names"] == FEATURES
    assert config["model_args"] == {
        "num_classes": 2,
        "in_chans": 3,
        "widths": [16],
        "dropout": 0.0,
        "activation": "relu",
    }
    result = invoke("eval", "--model", distilled, "--data", tiny["val"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # eval's accuracy is the student's own, recomputed from the directory here
    x, y = rows(60, 2)
    classifier = load_classifier(distilled)
    with torch.no_grad():
        predicted = classifier(torch.tensor(x, dtype=torch.float32)).argmax(1).numpy()
    assert report["accuracy"] == pytest.approx(float((predicted == y).mean()))
    assert report["accuracy"] == summary["best_val_accuracy"]


def test_the_feature_normalization_is_fitted_on_the_train_rows_alone(tiny, tmp_path):
    """--unlabeled and --val rows far from the train rows change nothing of it."""
    from safetensors.torch import load_file

    xu, _ = rows(120, 1, shift=1000.0)
    xv, yv = rows(60, 2, shift=-1000.0)
    far = {
        "unlabeled": write_csv(tmp_path / "u.csv", xu, None),
        "val": write_csv(tmp_path / "v.csv", xv, yv),
    }
    out = tmp_path / "run"
    extra = ["--teacher", tiny["teacher"], "--unlabeled", far["unlabeled"], "--val", far["val"]]
    result = invoke(*distill_args(tiny, out, *extra))
    assert result.exit_code == 0, result.output
    state = load_file(str(out / "student" / "model.safetensors"))
    x, _ = rows(60, 0)
    x = x.astype(np.float32).astype(np.float64)  # as the CSV is read
    assert state["feature_mean"].numpy() == pytest.approx(x.mean(0), rel=1e-5)
    assert state["feature_std"].numpy() == pytest.approx(x.std(0), rel=1e-5)


def test_a_constant_feature_is_only_centered():
    from kdplug.plugins import create

    model = create("students", "tabular:mlp,widths=4", 2, 2)
    model.fit_inputs(torch.tensor([[1.0, 7.0], [3.0, 7.0]]))
    assert model.feature_mean.tolist() == [2.0, 7.0]
    assert model.feature_std.tolist() == [1.0, 1.0]


def test_distill_on_sklearn_and_parquet_rows_then_eval(tmp_path):
    """sklearn:breast_cancer with a scikit-learn teacher, evaluated on a parquet copy."""
    import datasets
    from sklearn.datasets import load_breast_cancer

    from kdplug.data import load_data

    data = load_breast_cancer()
    teacher = tmp_path / "lr.skops"
    names = data.target_names[data.target]  # the classes by name, as the data has them
    skops.io.dump(LogisticRegression(max_iter=5000).fit(data.data, names), teacher)
    out = tmp_path / "bc"
    args = ["distill", "--student", "tabular:mlp,widths=32", "--train", "sklearn:breast_cancer"]
    args += ["--teacher", f"sklearn:{teacher}", "--out", out, "--epochs", "4", "--device", "cpu"]
    args += ["--batch-size", "32", "--lr", "3e-3"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    load_data("sklearn:breast_cancer").dataset.to_parquet(str(tmp_path / "bc.parquet"))
    assert datasets.load_dataset("parquet", data_files=str(tmp_path / "bc.parquet"))
    result = invoke(
        "eval", "--model", out, "--data", f"parquet:{tmp_path / 'bc.parquet'}", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 569 and report["accuracy"] > 0.8
    config = json.loads((out / "student" / "config.json").read_text())
    assert len(config["feature_names"]) == 30 and config["model_args"]["in_chans"] == 30


def test_self_train_runs_two_rounds_on_feature_rows(tiny, tmp_path):
    """Round 2's teachers include round 1's MLP (a kdplug: teacher of feature rows)."""
    out = tmp_path / "self"
    result = invoke(
        *["self-train", "--teacher", tiny["teacher"], "--student", "tabular:mlp,widths=16"],
        *["--train", tiny["train"], "--unlabeled", tiny["unlabeled"], "--val", tiny["val"]],
        *["--out", out, "--rounds", "2", "--epochs", "1", "--batch-size", "16"],
        *["--generator", "threshold,tau=0.5", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "self_train.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][1]["teachers"] == 2
    assert all(r["accepted"] > 0 for r in summary["rounds"])
    run = json.loads((out / "round-2" / "distill" / "run.json").read_text())
    assert "drop_path_rate" not in run["config"]["student"]  # the MLP has none


def refusal(result) -> str:
    assert result.exit_code == 2, result.output
    # (datasets' own "Generating train split" bar may come first, reading a CSV anew)
    lines = [line for line in result.stderr.splitlines() if line and "Generating" not in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_an_image_student_on_feature_rows_and_the_mlp_on_images_are_refused(tiny, tmp_path):
    line = refusal(
        invoke(*distill_args(tiny, tmp_path / "a", "--loss", "ce", student="timm:test_resnet"))
    )
    assert line == (
        f"Error: --student timm:test_resnet takes images; --train {tiny['train']} is tabular "
        "(a student for it: --student tabular:mlp)"
    )
    args = ["distill", "--student", "tabular:mlp", "--train", "sklearn:digits", "--loss", "ce"]
    line = refusal(invoke(*args, "--out", tmp_path / "b"))
    assert line == (
        "Error: --student tabular:mlp takes tabular rows; --train sklearn:digits is images "
        "(a student for it: --student timm:ARCH)"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_augment_and_unlike_rows_are_refused_with_feature_rows(tiny, tmp_path):
    out = tmp_path / "out"
    line = refusal(invoke(*distill_args(tiny, out, "--loss", "ce", "--augment", "default")))
    assert line == (
        f"Error: --augment default transforms images; --train {tiny['train']} is tabular (a "
        "tabular student's noise is its own, e.g. tabular:mlp,dropout=0.2)"
    )
    x, _ = rows(10, 3)
    two = write_csv(tmp_path / "two.csv", x[:, :2], None, FEATURES[:2])
    line = refusal(
        invoke(*distill_args(tiny, out, "--teacher", tiny["teacher"], "--unlabeled", two))
    )
    assert line == (
        "Error: --unlabeled rows have 2 features ['a', 'b'] but --train rows have 3 ['a', 'b', 'c']"
    )
    extra = ["--teacher", tiny["teacher"], "--unlabeled", "sklearn:digits"]
    line = refusal(invoke(*distill_args(tiny, out, *extra)))
    assert (
        line
        == f"Error: --unlabeled sklearn:digits holds images but --train {tiny['train']} is tabular"
    )
    assert not out.exists()


def test_a_missing_feature_value_in_the_train_rows_is_refused_naming_it(tmp_path):
    x, y = rows(20, 4)
    x[5, 1] = np.nan
    train = write_csv(tmp_path / "gap.csv", x, y)
    result = invoke(
        "distill",
        "--student",
        "tabular:mlp",
        "--train",
        train,
        "--loss",
        "ce",
        "--out",
        tmp_path / "o",
    )
    assert refusal(result) == (
        f"Error: --train {train}: row 5 has a missing (NaN) or infinite value in feature 'b'; "
        "the student fits its feature normalization on finite rows"
    )


def test_eval_refuses_data_the_student_cannot_read(distilled, tiny, tmp_path):
    from kdplug.model_dir import save_student
    from kdplug.plugins import create

    images = tmp_path / "cnn"
    cnn = create("students", "timm:test_resnet", 2, 1)
    save_student(
        images,
        cnn,
        architecture="test_resnet",
        classes=["0", "1"],
        input_size=[1, 8, 8],
        mean=[0.5],
        std=[0.25],
    )
    line = refusal(invoke("eval", "--model", images, "--data", tiny["val"]))
    assert line == (
        f"Error: {tiny['val']}: the student takes images; this dataset is tabular (a tabular "
        "student: --student tabular:mlp)"
    )
    line = refusal(invoke("eval", "--model", distilled, "--data", "sklearn:digits"))
    assert line == (
        "Error: sklearn:digits: the student takes tabular rows of 3 features; this dataset "
        "holds images"
    )
    x, y = rows(10, 3)
    two = write_csv(tmp_path / "two.csv", x[:, :2], y, FEATURES[:2])
    line = refusal(invoke("eval", "--model", distilled, "--data", two))
    assert line == (
        f"Error: {two}: the student takes 3 features ['a', 'b', 'c']; this dataset has 2 ['a', 'b']"
    )


def test_self_train_refuses_an_image_student_on_feature_rows_before_any_work(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke(
        *["self-train", "--teacher", tiny["teacher"], "--student", "timm:test_resnet"],
        *["--train", tiny["train"], "--unlabeled", tiny["unlabeled"], "--val", tiny["val"]],
        *["--out", out, "--overwrite", "--epochs", "1", "--device", "cpu"],
    )
    assert refusal(result) == (
        f"Error: --student timm:test_resnet takes images; --train "
        f"{tiny['train']} is tabular (a student for it: --student tabular:mlp)"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def doc_snippet() -> str:
    """The python block of docs/tabular.md's "With torch alone"."""
    text = (ROOT / "docs" / "tabular.md").read_text()
    section = text[text.index("### With torch alone") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_torch_only_snippet_predicts_as_kdplug_does(distilled):
    """The block runs with torch, safetensors and json alone and gives eval's logits."""
    from kdplug.model_dir import load_classifier

    code = doc_snippet()
    assert re.findall(r"^(?:import|from) (\S+)", code, re.M) == [
        "json",
        "torch",
        "torch.nn.functional",
        "safetensors.torch",
    ]
    namespace: dict = {}
    exec(code.replace("runs/tabular/student", str(distilled / "student")), namespace)
    assert len(namespace["predicted"]) == 4
    x = torch.tensor(rows(60, 2)[0], dtype=torch.float32)
    with torch.no_grad():
        expected = load_classifier(distilled)(x)
    assert torch.allclose(namespace["logits"](x), expected, atol=1e-5)


def test_distill_from_a_teacher_store_of_feature_rows(tiny, tmp_path):
    """kdplug cache of feature rows, then distill --store, as with images."""
    store = tmp_path / "store"
    cached = invoke(
        *["cache", "--teacher", tiny["teacher"], "--data", tiny["train"]],
        *["--data", tiny["unlabeled"], "--out", store],
    )
    assert cached.exit_code == 0, cached.output
    out = tmp_path / "run"
    result = invoke(*distill_args(tiny, out, "--unlabeled", tiny["unlabeled"], "--store", store))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["unlabeled"]["rows"] == 120
    assert json.loads((out / "student" / "config.json").read_text())["data_kind"] == "tabular"
