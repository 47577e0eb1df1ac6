"""The label run's report: counts, per-teacher figures, evaluation against true labels.

``LabelTally`` takes the run one shard at a time (``add``: the shard's dataset columns as
numpy arrays, its teachers' votes and weights and its bad-row mask), keeping counts per
class and per teacher and, for the accuracy-vs-coverage curve, a few numbers per row with
a true label; ``report`` then builds report.json's content (docs/label.md).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from kdplug.outputs import versions
from kdplug.reports.figures import new_figure, per_class_panel, save_figure
from kdplug.spec import parse_spec

COVERAGE_POINTS = [round(0.05 * i, 2) for i in range(1, 21)]
CONFIDENCE_BINS = 20


def _share(count: float, total: float) -> float | None:
    return float(count / total) if total else None


def row_class(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Each row's class: its label, or the argmax of its probs (``predicted``) where
    rejected; -1 (no class: not answered) where a rejected row's probs are uniform
    (``pate``'s unanswered rows), whose argmax would be class 0 by accident. ``confidence``
    is the probs' maximum."""
    uniform = columns["confidence"] <= columns["probs"].min(1)
    rejected = np.where(uniform, -1, columns["predicted"])
    return np.where(columns["accepted"], columns["label"], rejected)


class LabelTally:
    """The report's figures, gathered shard by shard. ``known_classes [K, C]``: which
    classes each teacher knows."""

    def __init__(self, K: int, C: int, known_classes: np.ndarray):
        self.known_classes = known_classes
        self.rows = self.accepted = self.bad = 0
        self.per_class = np.zeros(C, dtype=np.int64)
        self.predicted = np.zeros(C, dtype=np.int64)
        self.confidence_accepted = self.confidence_good = 0.0
        self.histogram = np.zeros((2, CONFIDENCE_BINS), dtype=np.int64)  # all rows, accepted
        self.agree = np.zeros(K)  # per teacher: votes equal to the accepted label
        self.weight = np.zeros(K)  # per teacher: sum of weights over good rows
        self.right = np.zeros(K)  # per teacher: votes equal to the true label
        self.known_rows = np.zeros(K)  # per teacher: labeled rows of a class it knows
        self.known_right = np.zeros(K)
        self.labeled = self.judged = self.judged_right = self.unanswered = 0
        self.confidence: list[np.ndarray] = []  # per shard: its answered labeled rows'
        self.correct: list[np.ndarray] = []  # ... and whether their class is the true one

    def add(
        self,
        columns: dict[str, np.ndarray],
        votes: np.ndarray,
        weights: np.ndarray,
        bad: np.ndarray,
        predicted: np.ndarray,
        truth: np.ndarray | None,
    ) -> None:
        """One shard: its dataset columns (with ``probs``), ``votes [K, R]``, ``weights
        [K, R]``, ``bad [R]``, the combined prediction's class ``predicted [R]`` and the
        true labels ``[R]`` (-1 unknown; None: the run has none)."""
        label, accepted, confidence = columns["label"], columns["accepted"], columns["confidence"]
        good = ~bad
        C = len(self.per_class)
        self.rows += len(label)
        self.accepted += int(accepted.sum())
        self.bad += int(bad.sum())
        self.per_class += np.bincount(label[label >= 0], minlength=C)
        self.predicted += np.bincount(predicted[good], minlength=C)
        self.confidence_accepted += float(confidence[accepted].sum(dtype=np.float64))
        self.confidence_good += float(confidence[good].sum(dtype=np.float64))
        edges = np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)
        self.histogram[0] += np.histogram(confidence, bins=edges)[0]
        self.histogram[1] += np.histogram(confidence[accepted], bins=edges)[0]
        self.agree += (votes[:, accepted] == label[accepted]).sum(1)
        self.weight += weights[:, good].sum(1, dtype=np.float64)
        if truth is None:
            return
        known = (truth >= 0) & good
        y = truth[known]
        self.labeled += int(known.sum())
        self.right += (votes[:, known] == y).sum(1)
        mine = self.known_classes[:, y]  # [K, M]: teacher k knows the row's class
        self.known_rows += mine.sum(1)
        self.known_right += ((votes[:, known] == y) & mine).sum(1)
        judged = accepted & known
        self.judged += int(judged.sum())
        self.judged_right += int((label[judged] == truth[judged]).sum())
        predicted_class = row_class(columns)
        answered = known & (predicted_class >= 0)
        self.unanswered += int((known & (predicted_class < 0)).sum())
        self.confidence.append(confidence[answered])
        self.correct.append(predicted_class[answered] == truth[answered])

    def report(
        self,
        *,
        record: dict[str, Any],
        settings: dict[str, Any],
        info: dict[str, Any],
        generator_options: dict[str, Any],
        seconds: float,
        labeled_rows: int,
    ) -> dict[str, Any]:
        """report.json's content (see docs/label.md for every field)."""
        classes = record["classes"]
        good = self.rows - self.bad
        has_truth = self.labeled > 0
        teachers = []
        for k, teacher in enumerate(record["teachers"]):
            entry = {
                **teacher,
                "temperature": record["temperatures"][k],
                "agreement": _share(self.agree[k], self.accepted),
                "mean_weight": _share(self.weight[k], good),
            }
            if has_truth:
                entry["accuracy"] = _share(self.right[k], self.labeled)
                entry["known_classes"] = int(self.known_classes[k].sum())
                entry["accuracy_known_classes"] = _share(self.known_right[k], self.known_rows[k])
            teachers.append(entry)
        per_class = dict(zip(classes, self.per_class.tolist()))
        return {
            "rows": self.rows,
            "accepted": self.accepted,
            "coverage": self.accepted / self.rows,
            "bad_rows": self.bad,
            "per_class": per_class,
            "empty_classes": [name for name, count in per_class.items() if not count],
            "predicted_per_class": dict(zip(classes, self.predicted.tolist())),
            "mean_confidence": _share(self.confidence_accepted, self.accepted),
            "mean_confidence_all": _share(self.confidence_good, good),
            "confidence_histogram": {
                "edges": np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1).round(4).tolist(),
                "all_rows": self.histogram[0].tolist(),
                "accepted": self.histogram[1].tolist(),
            },
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
            "eval": self.evaluation() if has_truth else None,
            "seconds": round(seconds, 3),
            "rows_labeled_this_run": labeled_rows,
            "versions": versions(),
        }

    def evaluation(self) -> dict[str, Any]:
        """Accuracy of the accepted labels, of every row's class, and accuracy vs coverage.

        Rows without a class (``row_class`` -1: not answered) are counted, not scored. The
        curve ranks the answered rows with a true label by confidence (ties by row order);
        the point at coverage ``c`` is the accuracy of the ``ceil(c * M)`` most confident rows.
        """
        confidence = np.concatenate([np.zeros(0, np.float32), *self.confidence])
        correct = np.concatenate([np.zeros(0, bool), *self.correct])
        order = np.argsort(-confidence, kind="stable")  # rows come in row order: ties by it
        correct, confidence = correct[order], confidence[order]
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
            "labeled_rows": self.labeled,
            "accepted_labeled_rows": self.judged,
            "unanswered_labeled_rows": self.unanswered,
            "accuracy_accepted": _share(self.judged_right, self.judged),
            "accuracy_all": float(correct.mean()) if len(correct) else None,
            "accuracy_vs_coverage": curve,
        }


def save_report_figure(report: dict[str, Any], path: str | os.PathLike) -> None:
    """report.png: see ``report_figure``."""
    save_figure(report_figure(report), path)


def operating_point(evaluation: dict[str, Any]) -> tuple[float, float] | None:
    """``(coverage, accuracy)`` of the generator's accepted rows among the answered rows
    with a true label: where it sits on the accuracy-vs-coverage curve (None: none)."""
    answered = evaluation["labeled_rows"] - evaluation["unanswered_labeled_rows"]
    if evaluation["accuracy_accepted"] is None or not answered:
        return None
    return evaluation["accepted_labeled_rows"] / answered, evaluation["accuracy_accepted"]


def report_figure(report: dict[str, Any]):
    """Accepted rows per class, confidence histogram, and (with true labels) accuracy vs
    coverage with the generator's operating point marked."""
    panels = 3 if report["eval"] else 2
    fig, axes = new_figure(1, panels, figsize=(4.5 * panels, 3.6))
    per_class_panel(
        axes[0],
        list(report["per_class"]),
        list(report["per_class"].values()),
        "accepted rows per class",
        xlabel="accepted rows",
        fmt="{:.0f}",
    )
    histogram = report["confidence_histogram"]
    edges = np.array(histogram["edges"])
    for key, color, name in (
        ("all_rows", "tab:gray", "all rows"),
        ("accepted", "tab:green", "accepted"),
    ):
        axes[1].stairs(histogram[key], edges, fill=True, color=color, label=name)
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
