"""The tensorboard plugin (issue 19, point 11): distill's metrics and label's report as
TensorBoard scalars, read back with TensorBoard's own EventAccumulator."""

import json
import sys

import pytest

from kdplug import UsageError


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


@pytest.fixture(scope="module")
def logistic_teacher(digits_splits, tmp_path_factory):
    import skops.io

    from tests.teacher_fixtures import fit_logistic

    path = tmp_path_factory.mktemp("tb-teacher") / "logreg.skops"
    skops.io.dump(fit_logistic(digits_splits["labeled"]), path)
    return f"sklearn:{path}"


def test_distill_and_label_write_their_numbers_as_scalars(
    digits_splits, logistic_teacher, tmp_path
):
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.label import LabelConfig, run_label

    board = tmp_path / "tb"
    out = tmp_path / "run"
    summary = distill(
        DistillConfig(
            student="timm:test_resnet",
            teachers=[logistic_teacher],
            train=digits_splits["labeled"],
            val=digits_splits["test"],
            out=str(out),
            combiner="mean",
            epochs=2,
            batch_size=50,
            device="cpu",
            tensorboard=str(board / "distill"),
        )
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(board / "distill")
    for key in ("loss", "ce", "kd", "lr", "val_accuracy", "val_nll", "samples_per_s"):
        expected = [(line["epoch"], line[key]) for line in lines]
        assert scalars[f"distill/{key}"] == [(s, pytest.approx(v)) for s, v in expected]
    weight = f"distill/teacher_weights/{next(iter(lines[0]['teacher_weights']))}"
    assert [v for _, v in scalars[weight]] == [1.0, 1.0]
    best = summary["best_val_accuracy"]
    assert scalars["distill/summary/best_val_accuracy"] == [(2, pytest.approx(best))]

    report = run_label(
        LabelConfig(
            teachers=[logistic_teacher],
            data=digits_splits["test"],
            out=str(tmp_path / "labels"),
            device="cpu",
            progress=False,
            tensorboard=str(board / "label"),
        )
    )
    scalars = _scalars(board / "label")
    for key in ("rows", "accepted", "coverage", "mean_confidence"):
        assert scalars[f"label/{key}"] == [(0, pytest.approx(report[key]))]
    accuracy = report["eval"]["accuracy_accepted"]
    assert scalars["label/eval/accuracy_accepted"] == [(0, pytest.approx(accuracy))]
    assert [v for _, v in scalars["label/eval/accuracy_vs_coverage"]] == pytest.approx(
        [p["accuracy"] for p in report["eval"]["accuracy_vs_coverage"]]
    )


def test_without_the_flag_the_hooks_do_nothing_and_import_nothing(monkeypatch, tmp_path):
    import kdplug_tensorboard

    from kdplug.run import Run

    # any import of torch.utils.tensorboard would now fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = Run(config={}, out=tmp_path, state={"epoch": 0}, options={"tensorboard": None})
    kdplug_tensorboard.on_fit_start(run=run)
    kdplug_tensorboard.on_epoch_end(run=run, epoch=1, metrics={"loss": 1.0})
    kdplug_tensorboard.on_fit_end(run=run, summary={"epochs": 1})
    kdplug_tensorboard.on_labels_written(run=run, path=str(tmp_path), report={"rows": 1})
    assert list(tmp_path.iterdir()) == []


def test_the_flag_without_the_extra_is_one_line_naming_it(monkeypatch):
    import importlib.util

    from kdplug.engines.distill import DistillConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    values = {"student": "s", "train": "t", "out": "o", "tensorboard": "tb"}
    with pytest.raises(UsageError, match=r"pip install 'kdplug\[tensorboard\]'$"):
        DistillConfig.from_mapping(values)
