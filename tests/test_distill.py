"""The distill engine, in process: distillation beats labels alone, the producer seam, bad
rows, event hooks, run directories and bad inputs (the CLI is in test_distill_cli.py)."""

import json

import numpy as np
import pytest
import torch

import kdplug
from kdplug import UsageError
from kdplug.engines.distill import DistillConfig, distill
from kdplug.engines.eval import evaluate_student
from kdplug.teacher_names import teacher_names
from kdplug.teachers import TeacherOutputs

STUDENT = "timm:test_resnet"


@pytest.fixture(scope="module")
def teachers(digits_splits, tmp_path_factory):
    """Two different teachers trained on the 1200 rows of the unlabeled split (with labels):
    a timm CNN trained by kdplug itself, and a scikit-learn logistic regression (skops)."""
    import skops.io
    from sklearn.linear_model import LogisticRegression

    from kdplug.data import load_data

    root = tmp_path_factory.mktemp("teachers")
    distill(
        DistillConfig(
            student=STUDENT,
            train=digits_splits["unlabeled"],
            out=str(root / "cnn"),
            loss="ce",
            epochs=3,
            batch_size=64,
            lr=3e-3,
            seed=1,
        )
    )
    source = load_data(digits_splits["unlabeled"])
    x, y, _ = source.batch(list(range(len(source))))
    logreg = LogisticRegression(max_iter=300).fit(x.flatten(1).numpy(), y.numpy())
    skops.io.dump(logreg, root / "logreg.skops")
    return [f"kdplug:{root / 'cnn'}", f"sklearn:{root / 'logreg.skops'}"]


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distilled_student_beats_the_labels_only_student(digits_splits, teachers, tmp_path):
    common = dict(student=STUDENT, train=digits_splits["labeled"], batch_size=32, lr=3e-3)
    # the baseline gets at least as many optimizer steps: 150 // 32 = 4 per epoch, 128 in all
    distill(DistillConfig(**common, out=str(tmp_path / "alone"), loss="ce", epochs=32))
    # labeled + unlabeled rows: 1350 // 32 = 42 steps per epoch, 126 in all
    summary = distill(
        DistillConfig(
            **common,
            out=str(tmp_path / "kd"),
            teachers=teachers,
            unlabeled=digits_splits["unlabeled"],
            epochs=3,
            combiner="mean",
        )
    )
    alone = evaluate_student(str(tmp_path / "alone" / "student"), digits_splits["test"])
    distilled = evaluate_student(str(tmp_path / "kd" / "student"), digits_splits["test"])
    print(
        f"test accuracy: labels only {alone['accuracy']:.3f}, distilled {distilled['accuracy']:.3f}"
    )
    assert distilled["accuracy"] >= alone["accuracy"] + 0.04
    assert [t["spec"] for t in summary["teachers"]] == teachers
    assert all(t["fingerprint"].startswith("sha256:") for t in summary["teachers"])
    lines = _lines(tmp_path / "kd")
    assert len(lines) == 3 and all(line["kd"] > 0 for line in lines)
    # the mean combiner weighs both teachers 1/2 on every row
    names = [t["name"] for t in summary["teachers"]]  # what tables call them: file stems
    assert names == teacher_names(teachers)
    assert lines[-1]["teacher_weights"] == pytest.approx({names[0]: 0.5, names[1]: 0.5})


class TableProducer:
    """A stand-in for a teacher store: one teacher's logits looked up by row index."""

    names = ["table"]

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.seen: list[torch.Tensor] = []

    def fingerprints(self):
        return ["table-v1"]

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> TeacherOutputs:
        self.seen.append(idx.clone())
        known = torch.ones(1, self.logits.shape[1], dtype=torch.bool)
        return TeacherOutputs(self.logits[idx].unsqueeze(0), known)


def test_a_producer_replaces_the_live_teachers(digits_splits, tmp_path):
    producer = TableProducer(torch.randn(597, 10))
    summary = distill(
        DistillConfig(
            student=STUDENT,
            train=digits_splits["labeled"],
            unlabeled=digits_splits["test"],
            out=str(tmp_path / "run"),
            epochs=1,
            batch_size=199,
            combiner="mean",  # auto would first run the producer on the labeled rows
        ),
        producer=producer,
    )
    # first the labeled train rows, checked before training (kdplug.teacher_checks)
    assert producer.seen[0].tolist() == list(range(150))
    rows = torch.cat(producer.seen[1:])
    # then every row once: train rows are 0..149, then the unlabeled rows 150..596
    assert sorted(rows.tolist()) == list(range(597))
    assert [len(batch) for batch in producer.seen[1:]] == [199, 199, 199]
    # a producer without specs: its names stand for them
    assert summary["teachers"] == [{"name": "table", "spec": "table", "fingerprint": "table-v1"}]


class NanRowsPlugin:
    """A teacher for the test: uniform logits, NaN on rows whose index is a multiple of 4."""

    class Teacher:
        uses_row_index = True

        def __call__(self, x, index):
            logits = torch.zeros(len(x), 10)
            logits[index % 4 == 0] = float("nan")
            return logits

    @kdplug.hookimpl
    def register_teachers(self, register):
        register("nan-rows", lambda ref: self.Teacher())


class RecorderPlugin:
    def __init__(self):
        self.calls = []

    @kdplug.hookimpl
    def on_fit_start(self, run):
        self.calls.append(("start", run.state["epoch"], str(run.out)))

    @kdplug.hookimpl
    def on_epoch_end(self, run, epoch, metrics):
        self.calls.append(("epoch", epoch, metrics["bad_rows"]))

    @kdplug.hookimpl
    def on_fit_end(self, run, summary):
        self.calls.append(("end", summary["epochs"], summary["bad_rows"]))


def test_skip_bad_rows_drops_and_counts_them_and_hooks_see_the_run(
    digits_splits, tmp_path, register_plugin
):
    register_plugin(NanRowsPlugin(), "nan-rows")
    recorder = RecorderPlugin()
    register_plugin(recorder, "recorder")
    config = dict(
        student=STUDENT,
        train=digits_splits["labeled"],
        teachers=["nan-rows:x"],
        epochs=2,
        batch_size=50,
    )
    with pytest.raises(UsageError, match="teacher nan-rows:x returned NaN or Inf.*--skip-bad-rows"):
        distill(DistillConfig(**config, out=str(tmp_path / "strict")))
    out = tmp_path / "skip"
    summary = distill(DistillConfig(**config, out=str(out), skip_bad_rows=True))
    bad = sum(1 for i in range(150) if i % 4 == 0)  # 150 rows in 3 full batches
    assert [line["bad_rows"] for line in _lines(out)] == [bad, bad]
    assert summary["bad_rows"] == 2 * bad
    assert recorder.calls == [
        ("start", 0, str(out)),
        ("epoch", 1, bad),
        ("epoch", 2, bad),
        ("end", 2, 2 * bad),
    ]


def test_augment_mixup_ema_dkd_and_fitted_components_run(digits_splits, teachers, tmp_path):
    summary = distill(
        DistillConfig(
            student=STUDENT,
            train=digits_splits["labeled"],
            val=digits_splits["test"],
            teachers=teachers,
            out=str(tmp_path / "run"),
            loss="dkd,warmup=2,T=auto",
            combiner="auto",
            augment="scale=0.5;1,hflip=0,mixup=0.4,cutmix=1.0",
            ema=True,
            epochs=1,
            batch_size=50,
        )
    )
    line = _lines(tmp_path / "run")[0]
    assert all(np.isfinite(line[key]) for key in ("loss", "ce", "kd", "val_accuracy"))
    assert summary["kept"] == "best"
    # auto and T=auto were fitted on the labeled train rows before training, and recorded
    assert set(summary["fitted"]) == {"fit_rows", "combiner", "loss"}
    assert summary["fitted"]["loss"]["T"] > 0


def test_mixup_targets_only_where_both_rows_are_labeled():
    from kdplug.augment import MixupLabels

    mixup = MixupLabels({"mixup_alpha": 1.0, "label_smoothing": 0.0}, num_classes=5)
    x = torch.rand(4, 1, 4, 4)
    labels = torch.tensor([0, -1, 2, 3])
    mixed, soft, valid = mixup(x.clone(), labels)
    assert valid.tolist() == [True, False, False, True]  # row i is mixed with row 3 - i
    lam = soft[0, 0].item()
    assert soft[0].tolist() == pytest.approx([lam, 0, 0, 1 - lam, 0])
    assert torch.allclose(mixed[0], lam * x[0] + (1 - lam) * x[3], atol=1e-6)
    assert mixup(x[:3], labels[:3])[1] is None  # odd batches are not mixed


def test_run_directory_refused_resumed_when_finished_and_overwritten(digits_splits, tmp_path):
    out = tmp_path / "run"
    config = dict(
        student=STUDENT,
        train=digits_splits["labeled"],
        out=str(out),
        loss="ce",
        epochs=1,
        batch_size=50,
    )
    first = distill(DistillConfig(**config))
    with pytest.raises(UsageError, match="already holds a run.*--resume.*--overwrite"):
        distill(DistillConfig(**config))
    assert distill(DistillConfig(**config, resume=True)) == first  # finished: nothing redone
    with pytest.raises(UsageError, match="different configuration"):
        distill(DistillConfig(**{**config, "epochs": 2}, resume=True))
    distill(DistillConfig(**{**config, "epochs": 2}, overwrite=True))
    assert [line["epoch"] for line in _lines(out)] == [1, 2]
    assert first["kept"] == "last" and first["best_val_accuracy"] is None  # no --val


@pytest.fixture(scope="module")
def unlabeled_only(tmp_path_factory):
    """A dataset whose labels are all missing (-1)."""
    import datasets

    images = [np.zeros((8, 8), dtype=np.uint8)] * 4
    path = tmp_path_factory.mktemp("nolabels") / "data"
    datasets.Dataset.from_dict({"image": images, "label": [-1] * 4}).save_to_disk(str(path))
    return f"disk:{path}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"keep": "first"}, "keep must be best or last"),
        ({"loss": "kdd"}, "did you mean 'kd'"),
        ({"combiner": "meen"}, "did you mean 'mean'"),
        ({}, "give --teacher SPEC"),
        ({"loss": "ce", "unlabeled": "UNLABELED"}, "--unlabeled rows would be unused"),
        ({"student": f"{STUDENT},num_classes=3", "loss": "ce"}, "come from the data"),
        ({"student": "timm:resnet_18", "loss": "ce"}, "did you mean 'resnet18'"),
        ({"augment": "flip=1", "loss": "ce"}, "--augment: unknown option"),
        ({"loss": "ce", "train": "NOLABELS"}, "no labeled rows"),
        (
            {"unlabeled": "UNLABELED,image_size=16", "teachers": ["kdplug:never-built"]},
            r"--unlabeled images are \[1, 16, 16\]",
        ),
    ],
)
def test_bad_inputs_are_usage_errors_and_write_nothing(
    change, message, digits_splits, unlabeled_only, tmp_path
):
    out = tmp_path / "out"
    values = {"student": STUDENT, "train": digits_splits["labeled"], "out": str(out), **change}
    for key in ("train", "unlabeled"):
        values[key] = values.get(key) and values[key].replace(
            "UNLABELED", digits_splits["unlabeled"]
        ).replace("NOLABELS", unlabeled_only)
    with pytest.raises(UsageError, match=message):
        distill(DistillConfig.from_mapping(values))
    assert not out.exists()


def test_config_mapping_uses_flag_names_and_refuses_unknown_keys():
    config = DistillConfig.from_mapping(
        {"teacher": "kdplug:a", "student": "s", "train": "t", "out": "o", "batch-size": 7,
         "lr": "3e-3"}
    )  # fmt: skip
    assert config.teachers == ["kdplug:a"] and config.batch_size == 7 and config.lr == 0.003
    with pytest.raises(UsageError, match="unknown key 'epoch'"):
        DistillConfig.from_mapping({"epoch": 3})
    with pytest.raises(UsageError, match="epochs must be an integer"):
        DistillConfig.from_mapping({"student": "s", "train": "t", "out": "o", "epochs": "x"})
