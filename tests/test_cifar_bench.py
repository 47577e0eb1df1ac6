"""bench/cifar100.py --smoke: the CIFAR-100 recipes run end to end through distill on a tiny
fake CIFAR-like dataset (the real benchmark needs a GPU and CIFAR-100 on disk)."""

from __future__ import annotations

import json
import sys

import datasets
import numpy as np

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import cifar100  # noqa: E402  (bench/ is no package)

CLASSES = ["apple", "aquarium_fish", "baby", "bear", "beaver"]  # CIFAR-100's first five


def fake_cifar(path, rows: int, seed: int) -> str:
    """``rows`` random 32x32 RGB images labeled like the hub's CIFAR-100 (image ``img``,
    labels ``coarse_label`` and ``fine_label``), saved with HF datasets; its ``disk:`` spec
    reading ``fine_label``."""
    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "coarse_label": datasets.ClassLabel(names=["aquatic", "other"]),
            "fine_label": datasets.ClassLabel(names=CLASSES),
        }
    )
    labels = [i % len(CLASSES) for i in range(rows)]
    columns = {
        "img": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(rows)],
        "coarse_label": [int(label >= 2) for label in labels],
        "fine_label": labels,
    }
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))
    return f"disk:{path},label_column=fine_label"


def test_cifar100_smoke_runs_every_recipe_through_distill(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar100, "SMOKE_ROWS", 40)  # 256 on the command line; cheaper here
    train = fake_cifar(tmp_path / "train", 48, 0)  # more than SMOKE_ROWS: cut to 40
    test = fake_cifar(tmp_path / "test", 16, 1)
    out = tmp_path / "out"
    # the recipes as on CIFAR-100, on the thin resnet8 so that the test stays cheap
    cifar100.ARGS = cifar100.parse_args(
        ["--train", train, "--test", test, "--out", str(out), "--smoke", "--device", "cpu"]
        + ["--workers", "0", "--teacher-model", "cifar:resnet8", "--student-model", "cifar:resnet8"]
    )
    cifar100.main()
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] and results["epochs"] == 1 and results["seeds"] == [0]
    assert list(results["students"]) == list(cifar100.RECIPES)
    for name, (loss, published) in cifar100.RECIPES.items():
        entry = results["students"][name]
        assert entry["loss"] == loss and entry["published"] == published
        assert len(entry["accuracy"]) == 1 and 0 <= entry["accuracy"][0] <= 1
        config = json.loads(
            (out / "runs" / f"{cifar100.run_name(name)}-seed0" / "run.json").read_text()
        )["config"]
        assert config["loss"] == loss and config["epochs"] == 1 and config["opt"] == "sgd"
        assert config["train"] == f"disk:{out / 'data' / 'train'},label_column=fine_label"
        teachers = [] if name == "student alone" else [f"kdplug:{out / 'runs' / 'teacher'}"]
        assert config["teachers"] == teachers
        assert config["unlabeled"] == (config["train"] if name == cifar100.CONSISTENT else None)
    teacher = json.loads((out / "runs" / "teacher" / "student" / "config.json").read_text())
    assert teacher["architecture"] == "resnet8" and teacher["student"] == "cifar"
    assert teacher["label_names"] == CLASSES  # fine_label, kept by the smoke subset's spec
    assert len(datasets.load_from_disk(str(out / "data" / "train"))) == 40
    table = (out / "results.md").read_text()
    assert "SMOKE RUN" in table and "| 73.33 |" in table and "| 76.32 |" in table
    assert "| 75.63 |" in table and "| 79.42 |" in table
