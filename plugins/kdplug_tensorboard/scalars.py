"""The TensorBoard tags and values of distill's metrics and label's report.

distill: ``distill/KEY`` for each number of an epoch's metrics.jsonl line (``loss``, ``ce``,
``kd``, ``lr``, ``val_accuracy``, ``val_nll``, ``samples_per_s``, ``epoch_time_s``,
``bad_rows``) and ``distill/teacher_weights/NAME`` for each teacher's mean weight, at step
EPOCH; ``distill/summary/KEY`` for the summary's ``best_val_accuracy``, ``best_epoch``,
``final_val_accuracy``, ``samples_per_s``. label: ``label/KEY`` for the report's top-level
numbers (``rows``, ``accepted``, ``coverage``, ...), ``label/per_class/CLASS``,
``label/eval/KEY`` and ``label/teachers/NAME/KEY``.
"""

from __future__ import annotations

import json
import math
from typing import Any

SUMMARY_KEYS = ("best_val_accuracy", "best_epoch", "final_val_accuracy", "samples_per_s")


def numbers(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    """``prefix/KEY`` -> value for every finite number in ``values`` (nested dicts as
    ``prefix/KEY/SUBKEY``; lists, strings, None and booleans left out)."""
    found: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            found.update(numbers(f"{prefix}/{key}", value))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                found[f"{prefix}/{key}"] = float(value)
    return found


def epoch_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl line (its ``epoch`` is the step, not a scalar)."""
    return numbers("distill", {k: v for k, v in metrics.items() if k != "epoch"})


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    return numbers("distill/summary", {k: summary.get(k) for k in SUMMARY_KEYS})


def config_text(config: dict[str, Any]) -> str:
    """The run's config as TensorBoard's text tab shows it (markdown code)."""
    return "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```"


def label_scalars(report: dict[str, Any]) -> dict[str, float]:
    top = {k: v for k, v in report.items() if k not in ("teachers", "eval")}
    found = numbers("label", {k: v for k, v in top.items() if not isinstance(v, dict)})
    found.update(numbers("label/per_class", report.get("per_class") or {}))
    found.update(numbers("label/eval", report.get("eval") or {}))
    for teacher in report.get("teachers") or []:
        name = teacher.get("name") or teacher["spec"]
        found.update(numbers(f"label/teachers/{name}", teacher))
    return found


def coverage_curve(report: dict[str, Any]) -> list[tuple[int, float]]:
    """(coverage in percent, accuracy) of the report's accuracy-vs-coverage curve."""
    curve = (report.get("eval") or {}).get("accuracy_vs_coverage") or []
    return [(round(100 * point["coverage"]), point["accuracy"]) for point in curve]
