"""Teachers that would quietly spoil a run are flagged; class names are checked (15.1, 15.4)."""

import logging

import numpy as np
import pytest
import torch

from kdplug import UsageError
from kdplug.teacher_checks import DISAGREE, MIN_ROWS, flag_teachers
from kdplug.teacher_names import teacher_names
from tests.teacher_fixtures import digits_arrays, save_torchscript

DIGITS = [str(c) for c in range(10)]
REVERSED = DIGITS[::-1]


def fit_logistic(spec: str, shuffle: bool = False, below: int = 10):
    """LogisticRegression on the rows of ``spec`` of classes ``< below`` (labels shuffled)."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits_arrays(spec)
    keep = y < below
    x, y = x[keep].reshape(int(keep.sum()), -1).numpy(), y[keep].numpy()
    if shuffle:
        y = np.random.default_rng(0).permutation(y)
    return LogisticRegression(max_iter=300).fit(x, y)


@pytest.fixture(scope="module")
def teachers(digits_splits, tmp_path_factory) -> dict[str, str]:
    """Specs of teachers trained on the digits' "unlabeled" split: ``named`` (scikit-learn,
    classes 0-9), ``unnamed`` (the same model as TorchScript, no class names), ``chance``
    (trained on shuffled labels), ``low`` (trained on digits 0-4 only)."""
    import skops.io

    root = tmp_path_factory.mktemp("teachers")
    train = digits_splits["unlabeled"]
    model = fit_logistic(train)
    specs = {}
    for name, fitted in (
        ("named", model),
        ("chance", fit_logistic(train, shuffle=True)),
        ("low", fit_logistic(train, below=5)),
    ):
        skops.io.dump(fitted, root / f"{name}.skops")
        specs[name] = f"sklearn:{root / name}.skops"
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        linear[1].weight.copy_(torch.from_numpy(model.coef_))
        linear[1].bias.copy_(torch.from_numpy(model.intercept_))
    save_torchscript(linear.eval(), root / "linear.ts")
    specs["unnamed"] = f"torchscript:{root / 'linear.ts'},allow_code=true"
    return specs


@pytest.fixture(scope="module")
def unlabeled(digits_splits, tmp_path_factory) -> str:
    """300 digit rows without a label column."""
    from kdplug.data import load_data

    source = load_data(digits_splits["test"])
    path = tmp_path_factory.mktemp("nolabel") / "rows"
    source.dataset.select(range(300)).remove_columns(source.label_column).save_to_disk(str(path))
    return f"disk:{path}"


def by_check(flags: list[dict]) -> dict[tuple[str, str], dict]:
    return {(flag["check"], flag["teacher"]): flag for flag in flags}


def name(spec: str) -> str:
    """What the checks call the teacher of ``spec`` (its file's stem)."""
    return teacher_names([spec])[0]


# -- the checks on tensors ------------------------------------------------------------------


def one_hot_scores(predicted: list[list[int]], classes: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), classes).float()


def test_flag_teachers_near_chance_and_disagreement_on_tensors():
    n = 4 * MIN_ROWS
    labels = torch.arange(n) % 4
    good = labels.tolist()
    shifted = ((labels + 1) % 4).tolist()  # always wrong: disagrees with good on every row
    known = torch.ones(3, 4, dtype=torch.bool)
    scores = one_hot_scores([good, good, shifted])
    flags = flag_teachers(["a", "b", "c"], scores, known, labels, rows="rows")
    assert set(by_check(flags)) == {("near_chance", "c"), ("disagrees", "c")}
    assert by_check(flags)["near_chance", "c"]["accuracy"] == 0.0
    assert by_check(flags)["disagrees", "c"]["agreement"] == {"a": 0.0, "b": 0.0}

    # without labels, two teachers that never agree are both flagged; a named and an
    # unnamed one get the class-order hint
    flags = flag_teachers(["a", "c"], scores[[0, 2]], known[:2], None, named=[True, False])
    assert [f["teacher"] for f in flags] == ["a", "c"]
    assert all(
        "names none, so its outputs are taken in the run's class order" in f["message"]
        for f in flags
    )
    # with labels, the teacher that is right is not the one flagged for disagreeing
    flags = flag_teachers(["a", "c"], scores[[0, 2]], known[:2], labels)
    assert set(by_check(flags)) == {("near_chance", "c"), ("disagrees", "c")}


def test_flag_teachers_needs_enough_rows_and_judges_only_known_classes():
    few = torch.arange(MIN_ROWS - 1) % 4
    scores = one_hot_scores([((few + 1) % 4).tolist(), few.tolist()])
    assert flag_teachers(["a", "b"], scores, torch.ones(2, 4, dtype=bool), few) == []
    # a teacher that knows classes 0-1 only is judged on the rows of those classes
    labels = torch.arange(4 * MIN_ROWS) % 4
    known = torch.tensor([[True, True, False, False], [True] * 4])
    halves = torch.where(labels < 2, labels, 0).tolist()
    flags = flag_teachers(["half", "all"], one_hot_scores([halves, labels.tolist()]), known, labels)
    assert flags == []
    assert DISAGREE < 0.5


# -- the commands ---------------------------------------------------------------------------


def test_a_near_chance_teacher_is_flagged_by_report_label_and_distill(
    teachers, digits_splits, tmp_path, caplog
):
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.label import LabelConfig, run_label
    from kdplug.engines.teachers import report

    specs, labeled = [teachers["named"], teachers["chance"]], digits_splits["labeled"]
    with caplog.at_level(logging.WARNING, logger="kdplug"):
        result = report(specs[1:], labeled)  # one teacher: the report's combiners are slow
    flags = by_check(result["teacher_checks"]["flags"])
    assert set(flags) == {("near_chance", name(teachers["chance"]))}
    flag = flags["near_chance", name(teachers["chance"])]
    assert flag["rows"] == 150 and flag["accuracy"] < 0.3 and flag["chance"] < 0.2
    chance = name(teachers["chance"])
    assert f"teacher {chance} is near chance on 150 labeled rows of" in caplog.text

    labels = run_label(LabelConfig(specs, labeled, str(tmp_path / "l"), progress=False))
    assert set(by_check(labels["teacher_checks"]["flags"])) == set(flags)

    config = DistillConfig(
        student="timm:test_resnet",
        train=labeled,
        out=str(tmp_path / "d"),
        teachers=specs,
        combiner="mean",
        epochs=1,
        batch_size=64,
        device="cpu",
    )
    summary = distill(config)
    assert set(by_check(summary["teacher_checks"]["flags"])) == set(flags)


def test_reversed_classes_are_flagged_with_the_class_order(teachers, unlabeled, tmp_path):
    from kdplug.engines.label import LabelConfig, run_label

    specs = [teachers["named"], teachers["unnamed"]]
    config = LabelConfig(specs, unlabeled, str(tmp_path / "l"), classes=REVERSED, progress=False)
    flags = by_check(run_label(config)["teacher_checks"]["flags"])
    assert set(flags) == {("disagrees", name(spec)) for spec in specs}
    message = flags["disagrees", name(teachers["unnamed"])]["message"]
    assert f"{name(teachers['named'])} names its classes and is aligned to the run's by" in message
    assert f"while {name(teachers['unnamed'])} names none" in message
    assert "check that order (--classes)" in message and str(REVERSED[:3])[:-1] in message


def test_a_teacher_accurate_on_calibration_rows_is_not_flagged_for_disagreeing(
    teachers, unlabeled, digits_splits, tmp_path
):
    """Two teachers that disagree on DATA's unlabeled rows: labeled --calibration-data rows
    say which one is off, and only that one is flagged (was: both)."""
    from kdplug.engines.label import LabelConfig, run_label

    specs = [teachers["named"], teachers["unnamed"]]
    config = LabelConfig(
        specs,
        unlabeled,
        str(tmp_path / "l"),
        classes=REVERSED,
        calibration_data=digits_splits["test"],
        combiner="mean",
        progress=False,
    )
    flags = by_check(run_label(config)["teacher_checks"]["flags"])
    unnamed = name(teachers["unnamed"])
    assert set(flags) == {("near_chance", unnamed), ("disagrees", unnamed)}
    assert flags["near_chance", unnamed]["message"].startswith(
        f"teacher {unnamed} is near chance on 447 labeled --calibration-data rows"
    )


def test_a_named_teacher_is_aligned_by_name_whatever_the_class_order(
    teachers, digits_splits, tmp_path
):
    from kdplug.data import load_data
    from kdplug.engines.label import LabelConfig, run_label
    from kdplug.teachers import build_teacher_set

    source = load_data(digits_splits["labeled"], REVERSED)
    teacher_set = build_teacher_set([teachers["named"]], REVERSED, data=source)
    x, y = digits_arrays(digits_splits["labeled"])
    scores = teacher_set(x).logits[0]
    own = teacher_set.teachers[0].estimator.predict(x.reshape(len(x), -1).numpy())
    assert [REVERSED[c] for c in scores.argmax(1).tolist()] == [str(c) for c in own]

    # with labels: the named teacher is fine, the unnamed one near chance and disagreeing
    specs = [teachers["named"], teachers["unnamed"]]
    config = LabelConfig(
        specs, digits_splits["labeled"], str(tmp_path / "l"), classes=REVERSED, progress=False
    )
    flags = by_check(run_label(config)["teacher_checks"]["flags"])
    assert set(flags) == {("near_chance", name(specs[1])), ("disagrees", name(specs[1]))}
    assert "check that order (--classes)" in flags["disagrees", name(specs[1])]["message"]


def test_a_named_teacher_lacking_run_classes_is_said(teachers, digits_splits, tmp_path, caplog):
    from kdplug.engines.label import LabelConfig, run_label

    specs, out = [teachers["low"], teachers["named"]], str(tmp_path / "l")
    with caplog.at_level(logging.WARNING, logger="kdplug"):
        report = run_label(LabelConfig(specs, digits_splits["labeled"], out, progress=False))
    flags = by_check(report["teacher_checks"]["flags"])
    assert set(flags) == {("lacks_classes", name(teachers["low"]))}
    assert flags["lacks_classes", name(teachers["low"])]["lacks"] == ["5", "6", "7", "8", "9"]
    low = name(teachers["low"])
    assert f"teacher {low} names 5 classes and lacks 5 of the run's 10" in caplog.text


def test_label_takes_its_classes_from_teachers_that_name_them(
    teachers, unlabeled, tmp_path, caplog
):
    from kdplug.engines.cache import CacheConfig, run_cache
    from kdplug.engines.label import LabelConfig, run_label

    store = tmp_path / "store"
    run_cache(CacheConfig([teachers["named"]], [unlabeled], str(store), classes=DIGITS))
    for specs in ([teachers["named"]], [f"store:{store}"]):
        out = tmp_path / f"l{len(list(tmp_path.iterdir()))}"
        report = run_label(LabelConfig(specs, unlabeled, str(out), progress=False))
        assert report["classes_from"] == "teachers" and report["classes"] == DIGITS

    specs = [teachers["low"], teachers["named"]]  # classes 0-4, then 0-9: their union
    with caplog.at_level(logging.WARNING, logger="kdplug"):
        report = run_label(LabelConfig(specs, unlabeled, str(tmp_path / "u"), progress=False))
    assert report["classes"] == DIGITS
    assert "which name different sets: their union of 10" in caplog.text

    specs = [teachers["named"], teachers["unnamed"]]
    with pytest.raises(UsageError, match=f"teacher {teachers['unnamed']} names no classes"):
        run_label(LabelConfig(specs, unlabeled, str(tmp_path / "n"), progress=False))


def test_cache_takes_its_classes_from_teachers_that_name_them(teachers, unlabeled, tmp_path):
    from kdplug.engines.cache import CacheConfig, run_cache

    record = run_cache(CacheConfig([teachers["named"]], [unlabeled], str(tmp_path / "s")))
    assert record["classes"] == DIGITS
    specs = [teachers["named"], teachers["unnamed"]]
    with pytest.raises(UsageError, match=f"teacher {teachers['unnamed']} names no classes"):
        run_cache(CacheConfig(specs, [unlabeled], str(tmp_path / "n")))
