"""Issue 15, point 8: reports that say what happened.

PATE's unanswered rows are not scored as class 0; a teacher of some classes is also scored
on its own classes; a one-teacher ``teachers report`` prints one row for the combiners that
give the same figures and says why; reliability diagrams label each bin with its row
count; report.png marks the generator's operating point on accuracy vs coverage; a
``--loss ce`` run's curves.png draws no kd line.
"""

import json

import numpy as np
import pytest

from kdplug.cli.label import summary
from kdplug.data import load_data
from kdplug.engines.label import LabelConfig, run_label
from kdplug.engines.teachers import format_report, reliability_figure
from kdplug.engines.teachers import report as teachers_report


def logits_file(path, truth: np.ndarray, accuracy: float, seed: int, classes=None) -> str:
    """A ``logits:`` teacher over the rows of ``truth``: right on about ``accuracy`` of
    them (else a random class), with random confidence; over ``classes`` (names) only when
    given, each row's true class mapped to its position there (a row of another class gets
    a random one)."""
    rng = np.random.default_rng(seed)
    names = classes or [str(c) for c in range(10)]
    position = {int(name): i for i, name in enumerate(names)}
    C = len(names)
    vote = np.array([position.get(int(t), rng.integers(C)) for t in truth])
    wrong = rng.random(len(truth)) > accuracy
    vote[wrong] = rng.integers(0, C, wrong.sum())
    z = rng.normal(size=(len(truth), C)).astype(np.float32)
    z[np.arange(len(truth)), vote] += rng.uniform(0.5, 6.0, len(truth)).astype(np.float32)
    np.save(path, z)
    spec = f"logits:{path}"
    return spec + (f",classes={';'.join(names)}" if classes else "")


@pytest.fixture(scope="module")
def unlabeled_truth(digits_splits) -> np.ndarray:
    return load_data(digits_splits["unlabeled"]).labels()


# -- PATE: unanswered rows are not answers ---------------------------------------------------


def test_pates_unanswered_rows_are_counted_not_scored_as_class_0(
    digits_splits, unlabeled_truth, tmp_path
):
    truth = unlabeled_truth
    teachers = [logits_file(tmp_path / f"t{k}.npy", truth, 0.7, seed=k) for k in range(3)]
    report = run_label(
        LabelConfig(
            teachers,
            digits_splits["unlabeled"],
            str(tmp_path / "out"),
            generator="pate,sigma=0.5,threshold=2.5,sigma1=0.5",
            progress=False,
        )
    )
    evaluation = report["eval"]
    unanswered = report["rows"] - report["accepted"]
    assert unanswered > 100  # rows the confident check left unlabeled
    assert evaluation["unanswered_labeled_rows"] == unanswered
    # every answered row is accepted: all-rows accuracy is the answered rows' own
    assert evaluation["accuracy_all"] == pytest.approx(evaluation["accuracy_accepted"])
    # scored as class 0, the unanswered rows would have pulled it far down
    assert evaluation["accuracy_all"] > (truth == 0).mean() + 0.5
    assert evaluation["accuracy_vs_coverage"][-1]["accuracy"] == pytest.approx(
        evaluation["accuracy_all"]
    )
    assert f"({unanswered} not answered)" in summary(report, "out")


# -- a teacher of some classes ---------------------------------------------------------------

HALF = ["0", "1", "2", "3", "4"]


def test_a_teacher_of_some_classes_is_scored_on_its_own_classes(digits_splits, tmp_path):
    data = digits_splits["labeled"]
    truth = load_data(data).labels()
    full = logits_file(tmp_path / "full.npy", truth, 0.9, seed=0)
    half = logits_file(tmp_path / "half.npy", truth, 0.95, seed=1, classes=HALF)
    result = teachers_report([full, half], data)
    entry = result["teachers"][1]
    z = np.load(tmp_path / "half.npy")
    own = truth < 5
    hand = (z.argmax(1)[own] == truth[own]).mean()
    assert entry["known_classes"] == 5
    assert entry["accuracy_known_classes"] == pytest.approx(hand)
    assert entry["accuracy"] == pytest.approx((z.argmax(1) == truth).mean())
    assert entry["accuracy"] < 0.6 < entry["accuracy_known_classes"]
    assert result["teachers"][0]["accuracy_known_classes"] == result["teachers"][0]["accuracy"]
    header, _, first, second = format_report(result).splitlines()[2:6]
    assert "on its classes" in header
    assert f"{hand:.4f} (5/10)" in second and "(10/10)" in first


def test_labels_report_scores_a_teacher_on_its_own_classes(
    digits_splits, unlabeled_truth, tmp_path
):
    truth = unlabeled_truth
    full = logits_file(tmp_path / "full.npy", truth, 0.9, seed=0)
    half = logits_file(tmp_path / "half.npy", truth, 0.95, seed=1, classes=HALF)
    report = run_label(
        LabelConfig([full, half], digits_splits["unlabeled"], str(tmp_path / "out"), progress=False)
    )
    entry = report["teachers"][1]
    z = np.load(tmp_path / "half.npy")
    own = truth < 5
    assert entry["known_classes"] == 5
    assert entry["accuracy_known_classes"] == pytest.approx((z.argmax(1)[own] == truth[own]).mean())
    assert report["teachers"][0]["known_classes"] == 10


# -- one teacher: one ensemble row -----------------------------------------------------------


def test_a_one_teacher_report_prints_one_row_for_the_combiners_that_agree(digits_splits, tmp_path):
    data = digits_splits["labeled"]
    teacher = logits_file(tmp_path / "one.npy", load_data(data).labels(), 0.9, seed=0)
    result = teachers_report([teacher], data)
    text = format_report(result)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ensemble"))
    assert "one teacher, so every combiner gives it all the weight" in lines[start]
    table = lines[start + 3 : lines.index("", start)]
    figures = {tuple(c[k] for k in ("accuracy", "nll", "ece")) for c in result["combiners"]}
    names = [c["name"] for c in result["combiners"]]
    assert len(names) >= 5 and len(table) < len(names)
    # one row per distinct figure, naming every combiner exactly once
    assert len(table) == len({tuple(f"{v:.4f}" for v in f) for f in figures})
    listed = ", ".join(row.split("  ")[0] for row in table).replace(" (held out)", "")
    assert sorted(listed.split(", ")) == sorted(names)


# -- figures ---------------------------------------------------------------------------------


def test_reliability_diagrams_label_each_bin_with_its_count(digits_splits, tmp_path):
    data = digits_splits["labeled"]
    teacher = logits_file(tmp_path / "one.npy", load_data(data).labels(), 0.8, seed=0)
    entry = teachers_report([teacher], data)["teachers"][0]
    fig = reliability_figure(entry)
    counts = [n for n in entry["reliability"]["count"] if n]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [str(n) for n in counts] and sum(counts) == 150


@pytest.fixture
def captured(monkeypatch):
    """The figures the code saves, kept open (the save itself is skipped)."""
    figures = []
    monkeypatch.setattr("kdplug.reports.figures.save_figure", lambda fig, path: figures.append(fig))
    monkeypatch.setattr("kdplug.reports.label.save_figure", lambda fig, path: figures.append(fig))
    return figures


def test_report_png_marks_the_generators_operating_point(
    digits_splits, unlabeled_truth, tmp_path, captured
):
    teachers = [logits_file(tmp_path / f"t{k}.npy", unlabeled_truth, 0.8, k) for k in range(2)]
    out = tmp_path / "out"
    report = run_label(
        LabelConfig(
            teachers,
            digits_splits["unlabeled"],
            str(out),
            generator="threshold,tau=0.9",
            progress=False,
        )
    )
    evaluation = report["eval"]
    panel = captured[-1].axes[2]
    stars = [line for line in panel.lines if line.get_marker() == "*"]
    assert len(stars) == 1
    x, y = stars[0].get_xdata()[0], stars[0].get_ydata()[0]
    assert x == pytest.approx(evaluation["accepted_labeled_rows"] / evaluation["labeled_rows"])
    assert y == pytest.approx(evaluation["accuracy_accepted"])
    assert "threshold" in stars[0].get_label()
    assert json.loads((out / "report.json").read_text())["eval"] == evaluation


def test_a_ce_run_draws_only_the_losses_that_ran(digits_splits, tmp_path, captured):
    from kdplug.engines.distill import DistillConfig, distill

    common = dict(
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        epochs=2,
        batch_size=75,
        seed=0,
    )
    distill(DistillConfig(**common, out=str(tmp_path / "ce"), loss="ce"))
    drawn = [line.get_label() for line in captured[-1].axes[0].lines]
    assert drawn == ["loss", "ce"]
    truth = load_data(digits_splits["labeled"]).labels()
    teacher = logits_file(tmp_path / "t.npy", truth, 0.9, seed=0)
    distill(DistillConfig(**common, out=str(tmp_path / "kd"), teachers=[teacher], combiner="mean"))
    assert [line.get_label() for line in captured[-1].axes[0].lines] == ["loss", "ce", "kd"]
