"""bench/own_teachers.py's bookkeeping: what it reads off kdplug's outputs and how it decides
its targets (the benchmark itself is too slow for the suite)."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import own_teachers  # noqa: E402

TEACHERS = {"logreg": "sklearn:l.skops", "cnn_ts": "torchscript:c.pt"}


def seed(number: int, distill: float, alone: float, **changes) -> dict:
    """One seed's results as run_seed records them."""
    result = {
        "seed": number,
        "teacher_specs": TEACHERS,
        "seconds": 1.0,
        "report_test": {"teachers": {"logreg": 0.95, "cnn_ts": 0.93}, "combiners": {}},
        "label": own_teachers.label_figures(
            {
                "rows": 100,
                "accepted": 50,
                "coverage": 0.5,
                "per_class": dict.fromkeys(own_teachers.CLASSES, 5),
                "eval": {"accuracy_accepted": 0.99, "accuracy_all": 0.95},
            }
        ),
        "distill": {"test_accuracy": distill},
        "labels_only": {"test_accuracy": alone},
        "labels_only_same_steps": {"test_accuracy": alone},
        "self_train": {
            "rounds": [
                {"round": 0, "val_accuracy": 0.90, "test_accuracy": 0.89, "accepted": None},
                {"round": 1, "val_accuracy": 0.94, "test_accuracy": 0.93, "accepted": 40},
            ],
            "best_rounds": [1],
            "kept_round": 1,
        },
    }
    result.update(changes)
    return result


def verdicts(seeds: list[dict]) -> list[bool]:
    return [target["pass"] for target in own_teachers.targets(seeds).values()]


def test_a_class_with_no_row_is_empty_whether_listed_at_zero_or_left_out():
    per_class = dict.fromkeys(own_teachers.CLASSES, 3)
    per_class["5"] = 0
    del per_class["9"]
    report = {"rows": 30, "accepted": 24, "coverage": 0.8, "per_class": per_class, "eval": None}
    figures = own_teachers.label_figures(report)
    assert figures["empty_classes"] == ["5", "9"]
    assert figures["accuracy_accepted"] is None


def test_every_target_passes_on_figures_that_meet_it():
    assert verdicts([seed(0, 0.96, 0.90), seed(1, 0.97, 0.91)]) == [True, True, True, True]


def test_each_target_fails_on_the_figure_that_misses_it():
    # the mean over seeds decides the students' targets: 0.955 >= the logreg's 0.95
    assert verdicts([seed(0, 0.96, 0.90), seed(1, 0.95, 0.90)])[:2] == [True, True]
    assert verdicts([seed(0, 0.94, 0.90)])[:2] == [True, False]
    assert verdicts([seed(0, 0.94, 0.945)])[:2] == [False, False]
    low = seed(0, 0.96, 0.9)
    low["label"] = {**low["label"], "accuracy_accepted": 0.97}
    empty = seed(1, 0.96, 0.9)
    empty["label"] = {**empty["label"], "empty_classes": ["9"]}
    assert verdicts([seed(2, 0.96, 0.9), low])[2] is False
    assert verdicts([seed(2, 0.96, 0.9), empty])[2] is False
    unnamed = seed(0, 0.96, 0.9)
    unnamed["self_train"] = {**unnamed["self_train"], "kept_round": None}
    worse = seed(1, 0.96, 0.9)
    worse["self_train"] = {**worse["self_train"], "kept_round": 0}
    assert verdicts([unnamed])[3] is False
    assert verdicts([worse])[3] is False


def test_a_failed_command_fails_its_targets_and_shows_its_error():
    error = {"error": "kdplug self-train exited 2: Error: images differ"}
    broken = seed(0, 0.96, 0.9, self_train=error)
    broken["distill"] = {"error": "kdplug distill exited 1"}
    found = own_teachers.targets([broken, seed(1, 0.96, 0.9)])
    assert [t["pass"] for t in found.values()] == [False, False, True, False]
    assert "images differ" in found["self-train keeps its best round"]["figures"]
    assert "kdplug distill exited 1" in found["distill >= labels only"]["figures"]
    results = {"seeds": [broken], "splits": {"test": 397}, "targets": found}
    text = own_teachers.markdown(results)
    assert "images differ" in text and "**FAIL** distill >= labels only" in text
    assert "| 0 | 0.9500 | 0.9300 | n/a |" in text
