"""``kdplug eval``: the report against an independent computation, files, bad input."""

import json

import numpy as np
import pytest
import torch

from kdplug.engines.eval import report
from tests.conftest import invoke_cli


@pytest.fixture(scope="module")
def student(digits_splits, tmp_path_factory):
    """A student directory: test_resnet trained for 2 epochs on the labeled rows."""
    from kdplug.engines.distill import DistillConfig, distill

    out = tmp_path_factory.mktemp("eval") / "run"
    distill(
        DistillConfig(
            student="timm:test_resnet",
            train=digits_splits["labeled"],
            out=str(out),
            loss="ce",
            epochs=2,
            batch_size=50,
            lr=3e-3,
        )
    )
    return out / "student"


def _expected_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    total = 0.0
    for low, high in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_eval_cli_matches_an_independent_computation(student, digits_splits, tmp_path):
    import timm

    from kdplug.data import load_data

    out = tmp_path / "eval"
    args = ["eval", "--model", str(student), "--data", digits_splits["test"], "--json"]
    result = invoke_cli(*args, "--out", out, "--batch-size", "100")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert json.loads((out / "eval.json").read_text()) == got
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = timm.create_model(f"local-dir:{student}", pretrained=True).eval()
    config = model.pretrained_cfg  # the student's input recipe and label names
    test = load_data(digits_splits["test"])
    x, y, _ = test.batch(list(range(len(test))))
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(model((x - mean) / std), 1).double().numpy()
    labels = y.numpy()
    predicted = probs.argmax(1)

    assert got["rows"] == got["labeled_rows"] == 447
    assert got["accuracy"] == pytest.approx((predicted == labels).mean(), abs=1e-9)
    nll = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert got["nll"] == pytest.approx(nll, rel=1e-4)
    assert got["ece"] == pytest.approx(_expected_ece(probs, labels), abs=1e-4)
    matrix = np.zeros((10, 10), dtype=int)
    np.add.at(matrix, (labels, predicted), 1)
    assert got["confusion_matrix"] == matrix.tolist()
    for c, name in enumerate(config["label_names"]):
        assert got["per_class_accuracy"][name] == pytest.approx(
            (predicted[labels == c] == c).mean()
        )


def test_report_on_hand_made_probabilities():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.5, 0.5, 0.0]])
    labels = np.array([0, 1, 1, -1])  # the last row has no label; class c has no rows
    got = report(probs, labels, ["a", "b", "c"])
    assert got["labeled_rows"] == 3 and got["rows"] == 4
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": None}
    assert got["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert got["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4)) / 3)


def test_eval_on_data_without_labels_is_exit_2(student, tmp_path):
    import datasets

    path = tmp_path / "nolabels"
    images = [np.zeros((8, 8), dtype=np.uint8)] * 3
    datasets.Dataset.from_dict({"image": images}).save_to_disk(str(path))
    result = invoke_cli("eval", "--model", student, "--data", f"disk:{path}")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: disk:{path}: no label column to evaluate on (columns: ['image'])"
    )
