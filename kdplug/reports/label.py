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
    """Each row's class: its label, or the argmax of its probs where rejected."""
    return np.where(columns["accepted"], columns["label"], columns["probs"].argmax(1))


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
) -> dict[str, Any]:
    """report.json's content (see docs/label.md for every field)."""
    label, accepted = columns["label"], columns["accepted"]
    bad = merged["bad"].numpy()
    votes = merged["teacher_probs"].argmax(-1).numpy()  # [K, N]
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
        teachers.append(entry)
    return {
        "rows": len(label),
        "accepted": int(accepted.sum()),
        "coverage": float(accepted.mean()),
        "bad_rows": int(bad.sum()),
        "per_class": {name: int((label == i).sum()) for i, name in enumerate(classes)},
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

    The curve ranks the rows with a true label by confidence (ties by row order); the
    point at coverage ``c`` is the accuracy of the ``ceil(c * M)`` most confident rows.
    """
    label, accepted = columns["label"], columns["accepted"]
    judged = accepted & known
    predicted = row_class(columns)
    order = np.lexsort((columns["index"][known], -columns["confidence"][known]))
    correct = (predicted[known] == truth[known])[order]
    confidence = columns["confidence"][known][order]
    running = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    curve = []
    for coverage in COVERAGE_POINTS:
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
        "accuracy_accepted": _mean(label[judged] == truth[judged]),
        "accuracy_all": _mean(correct),
        "accuracy_vs_coverage": curve,
    }


def save_report_figure(
    report: dict[str, Any], columns: dict[str, np.ndarray], path: str | os.PathLike
) -> None:
    """report.png: accepted rows per class, confidence histogram, and (with true labels)
    accuracy vs coverage."""
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
        axes[2].set_xlabel("coverage (most confident rows first)")
        axes[2].set_ylabel("accuracy")
        axes[2].set_title("accuracy vs coverage")
        axes[2].set_xlim(0, 1.02)
    save_figure(fig, path)
