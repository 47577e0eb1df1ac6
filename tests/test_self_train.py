"""kdplug self-train: rounds of labeling and noisy-student training."""

import json

import numpy as np
import pytest
import skops.io
from sklearn.linear_model import LogisticRegression

from kdplug.data import load_data
from kdplug.engines.self_train import write_targets
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def logreg(digits_splits, tmp_path_factory):
    """A logistic regression fitted on the labeled digits, saved with skops."""
    from kdplug.data import batches

    source = load_data(digits_splits["labeled"])
    x, y, _ = next(iter(batches(source, len(source))))
    path = tmp_path_factory.mktemp("teachers") / "logreg.skops"
    skops.io.dump(LogisticRegression(max_iter=2000).fit(x.flatten(1).numpy(), y.numpy()), path)
    return f"sklearn:{path}"


def test_targets_are_one_hot_then_soft(tmp_path):
    probs = np.array([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]], dtype=np.float32)
    spec = write_targets(np.array([2, 0]), probs, ["a", "b", "c"], tmp_path / "t.npy")
    assert (spec.name, spec.ref) == ("logits", str(tmp_path / "t.npy"))
    assert spec.options == {"probs": True, "classes": ["a", "b", "c"]}
    saved = np.load(tmp_path / "t.npy")
    assert saved.tolist() == [[0, 0, 1], [1, 0, 0], *probs.tolist()]


def self_train_args(teacher, splits, out, rounds, epochs, generator) -> list[str]:
    return [
        *["self-train", "--teacher", teacher, "--student", "timm:test_resnet"],
        *["--train", splits["labeled"], "--unlabeled", splits["unlabeled"]],
        *["--val", splits["test"], "--out", str(out), "--rounds", str(rounds)],
        *["--epochs", str(epochs), "--generator", generator, "--device", "cpu"],
    ]


def test_two_rounds_end_to_end(digits_splits, logreg, tmp_path):
    out = tmp_path / "self"
    args = self_train_args(logreg, digits_splits, out, 2, 2, "threshold,tau=0.5")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    table = [line.split() for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [row[:2] for row in table] == [["1", "1"], ["2", "2"]]
    summary = json.loads((out / "self_train.json").read_text())
    first = summary["rounds"][0]
    labels = load_data(f"disk:{out / 'round-1' / 'labels'}").dataset
    accepted = int(np.sum(labels["accepted"]))
    assert first["accepted"] == accepted > 0
    assert np.load(out / "round-1" / "targets.npy").shape == (150 + accepted, 10)
    assert len(load_data(f"disk:{out / 'round-1' / 'pseudo'}")) == accepted
    assert (out / "round-2" / "distill" / "student" / "model.safetensors").exists()
    assert (out / "rounds.png").stat().st_size > 0
    assert 0.0 <= first["val_accuracy"] <= 1.0 and first["pseudo_label_accuracy"] > 0.8
    again = run_cli(*args, "--resume")  # a finished run resumes to the same table
    assert again.returncode == 0 and [r[:3] for r in table] == [
        line.split()[:3] for line in again.stdout.splitlines() if line[:5].strip().isdigit()
    ]


def test_no_accepted_row_is_a_clear_error(digits_splits, logreg, tmp_path):
    args = self_train_args(logreg, digits_splits, tmp_path / "s", 1, 1, "threshold,tau=1.0")
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: round 1: the generator threshold,tau=1.0 accepted no row; lower its threshold"
    ]


def test_rounds_hand_the_engines_specs_built_from_values(
    digits_splits, logreg, tmp_path, monkeypatch
):
    """Every spec text that reaches a registry is one the user wrote; what the engine adds
    (targets, the round's student, its loss, its data) arrives as a Spec of Python values."""
    from kdplug.engines.self_train import SelfTrainConfig, self_train
    from kdplug.registry import Registry
    from kdplug.spec import Spec

    seen: list = []
    real_create = Registry.create

    def spying(self, spec, *args, **extra):
        seen.append(spec)
        return real_create(self, spec, *args, **extra)

    monkeypatch.setattr(Registry, "create", spying)
    cfg = SelfTrainConfig(
        teachers=[logreg],
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        unlabeled=digits_splits["unlabeled"],
        val=digits_splits["test"],
        out=str(tmp_path / "self"),
        rounds=2,
        epochs=1,
        generator="threshold,tau=0.5",
        device="cpu",
    )
    rows = self_train(cfg, echo=lambda line: None)
    assert len(rows) == 2
    written = {logreg, cfg.student, cfg.generator, cfg.combiner}
    texts = {spec for spec in seen if isinstance(spec, str)}
    assert texts <= written, texts - written
    built = {(s.name, s.ref) for s in seen if isinstance(s, Spec) and s.raw is None}
    student = str(tmp_path / "self" / "round-1" / "distill" / "student")
    assert ("kdplug", student) in built and ("kd", None) in built
    assert ("logits", str(tmp_path / "self" / "round-2" / "targets.npy")) in built
    students = [s for s in seen if isinstance(s, Spec) and s.name == "timm"]
    assert students and all(s.raw["drop_path_rate"] == "0.1" for s in students)
