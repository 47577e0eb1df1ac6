"""The label run's report: counts, per-teacher figures, evaluation against true labels.

Inputs are the dataset columns of kdplug.engines.label (numpy arrays over the N rows) and the
merged shard tensors (``teacher_probs [K, N, C]``, ``weights [K, N]``, ``bad [N]``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from kdplug.outputs import versions
from kdplug.reports.figures import new_figure, save_figure
from kdplug.spec import parse_spec

COVERAGE_POINTS = [round(0.05 * i, 2) for i in range(1, 21)]


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def row_class(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Each row's class: its label, or the argmax of its probs where rejected; -1 (no
    class: not answered) where a rejected row's probs are uniform (``pate``'s unanswered
    rows), whose argmax would be class 0 by accident."""
    probs = columns["probs"]
    uniform = probs.max(1) <= probs.min(1)
    rejected = np.where(uniform, -1, probs.argmax(1))
    return np.where(columns["accepted"], columns["label"], rejected)


def known_class_accuracy(
    votes: np.ndarray, truth: np.ndarray, rows: np.ndarray, known: np.ndarray
) -> float | None:
    """Accuracy of one teacher's ``votes [N]`` on the ``rows`` whose true class it knows
    (``known [C]``): its figure on its own classes, where it was trained on some only."""
    mine = rows & known[np.clip(truth, 0, None)]
    return _mean(votes[mine] == truth[mine])


def build_report(
    *,
    record: dict[str, Any],
    settings: dict[str, Any],
    columns: dict[str, np.ndarray],
    merged: dict[str, Any],
    info: dict[str, Any],
    generator_options: dict[str, Any],
    truth: np.ndarray | None,
    seconds: float,
    labeled_rows: int,
    known_classes: np.ndarray | None = None,
) -> dict[str, Any]:
    """report.json's content (see docs/label.md for every field). ``known_classes [K, C]``:
    which classes each teacher knows (all when None)."""
    label, accepted = columns["label"], columns["accepted"]
    bad = merged["bad"].numpy()
    votes = merged["teacher_probs"].argmax(-1).numpy()  # [K, N]
    if known_classes is None:
        known_classes = np.ones((len(votes), len(record["classes"])), dtype=bool)
    weights = merged["weights"].numpy()  # [K, N]
    classes = record["classes"]
    known = None if truth is None else (truth >= 0) & ~bad
    if known is not None and not known.any():  # every labeled row was a bad row
        known = None
    teachers = []
    for k, teacher in enumerate(record["teachers"]):
        entry = {
            **teacher,
            "temperature": record["temperatures"][k],
            "agreement": _mean(votes[k][accepted] == label[accepted]),
            "mean_weight": _mean(weights[k][~bad]),
        }
        if known is not None:
            entry["accuracy"] = _mean(votes[k][known] == truth[known])
            entry["known_classes"] = int(known_classes[k].sum())
            entry["accuracy_known_classes"] = known_class_accuracy(
                votes[k], truth, known, known_classes[k]
            )
        teachers.append(entry)
    per_class = {name: int((label == i).sum()) for i, name in enumerate(classes)}
    predicted = merged["target"].argmax(1).numpy()[~bad]
    return {
        "rows": len(label),
        "accepted": int(accepted.sum()),
        "coverage": float(accepted.mean()),
        "bad_rows": int(bad.sum()),
        "per_class": per_class,
        "empty_classes": [name for name, count in per_class.items() if not count],
        "predicted_per_class": {
            name: int((predicted == i).sum()) for i, name in enumerate(classes)
        },
        "mean_confidence": _mean(columns["confidence"][accepted]),
        "mean_confidence_all": _mean(columns["confidence"][~bad]),
        "classes": classes,
        "teachers": teachers,
        "combiner": record["combiner"],
        "generator": {
            "spec": settings["generator"],
            "name": parse_spec(settings["generator"]).name,
            "options": generator_options,
            "info": info,
        },
        "data": record["data"],
        "calibration": record["calibration"],
        "with_inputs": settings["with_inputs"],
        "eval_labels": settings["eval_labels"],
        "eval": None if known is None else evaluate(columns, truth, known),
        "seconds": round(seconds, 3),
        "rows_labeled_this_run": labeled_rows,
        "versions": versions(),
    }


def evaluate(columns: dict[str, np.ndarray], truth: np.ndarray, known: np.ndarray) -> dict:
    """Accuracy of the accepted labels, of every row's class, and accuracy vs coverage.

    Rows without a class (``row_class`` -1: not answered) are counted, not scored. The
    curve ranks the answered rows with a true label by confidence (ties by row order); the
    point at coverage ``c`` is the accuracy of the ``ceil(c * M)`` most confident rows.
    """
    label, accepted = columns["label"], columns["accepted"]
    judged = accepted & known
    predicted = row_class(columns)
    answered = known & (predicted >= 0)
    unanswered = int((known & (predicted < 0)).sum())
    order = np.lexsort((columns["index"][answered], -columns["confidence"][answered]))
    correct = (predicted[answered] == truth[answered])[order]
    confidence = columns["confidence"][answered][order]
    running = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    curve = []
    for coverage in COVERAGE_POINTS if len(correct) else []:
        n = max(1, math.ceil(coverage * len(correct)))
        curve.append(
            {
                "coverage": n / len(correct),
                "accuracy": float(running[n - 1]),
                "min_confidence": float(confidence[n - 1]),
            }
        )
    return {
        "labeled_rows": int(known.sum()),
        "accepted_labeled_rows": int(judged.sum()),
        "unanswered_labeled_rows": unanswered,
        "accuracy_accepted": _mean(label[judged] == truth[judged]),
        "accuracy_all": _mean(correct),
        "accuracy_vs_coverage": curve,
    }


def save_report_figure(
    report: dict[str, Any], columns: dict[str, np.ndarray], path: str | os.PathLike
) -> None:
    """report.png: see ``report_figure``."""
    save_figure(report_figure(report, columns), path)


def operating_point(evaluation: dict[str, Any]) -> tuple[float, float] | None:
    """``(coverage, accuracy)`` of the generator's accepted rows among the answered rows
    with a true label: where it sits on the accuracy-vs-coverage curve (None: none)."""
    answered = evaluation["labeled_rows"] - evaluation["unanswered_labeled_rows"]
    if evaluation["accuracy_accepted"] is None or not answered:
        return None
    return evaluation["accepted_labeled_rows"] / answered, evaluation["accuracy_accepted"]


def report_figure(report: dict[str, Any], columns: dict[str, np.ndarray]):
    """Accepted rows per class, confidence histogram, and (with true labels) accuracy vs
    coverage with the generator's operating point marked."""
    panels = 3 if report["eval"] else 2
    fig, axes = new_figure(1, panels, figsize=(4.5 * panels, 3.6))
    names = list(report["per_class"])
    axes[0].bar(range(len(names)), list(report["per_class"].values()), color="tab:blue")
    axes[0].set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0)
    axes[0].set_title("accepted rows per class")
    bins = np.linspace(0.0, 1.0, 21)
    confidence = columns["confidence"]
    axes[1].hist(confidence, bins=bins, color="tab:gray", label="all rows")
    axes[1].hist(confidence[columns["accepted"]], bins=bins, color="tab:green", label="accepted")
    axes[1].set_title("confidence")
    axes[1].legend()
    if report["eval"]:
        curve = report["eval"]["accuracy_vs_coverage"]
        axes[2].plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], marker="o")
        point = operating_point(report["eval"])
        if point is not None:
            axes[2].plot(
                *([value] for value in point),
                marker="*",
                markersize=14,
                color="tab:red",
                linestyle="none",
                label=f"{report['generator']['name']}: {point[0]:.1%} at {point[1]:.2%}",
            )
            axes[2].legend(loc="lower left", fontsize=8)
        axes[2].set_xlabel("coverage (most confident rows first)")
        axes[2].set_ylabel("accuracy")
        axes[2].set_title("accuracy vs coverage")
        axes[2].set_xlim(0, 1.02)
    return fig
