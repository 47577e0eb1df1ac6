"""Classification metrics shared by reports: accuracy, NLL, ECE, agreement.

Inputs are probabilities ``[N, C]`` (rows sum to 1) and labels ``[N]`` (-1 rows ignored),
as numpy arrays or tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15


def _arrays(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(
        probs.detach().cpu() if hasattr(probs, "detach") else probs, dtype=np.float64
    )
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels, dtype=np.int64)
    keep = labels >= 0
    return probs[keep], labels[keep]


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of labeled rows whose argmax equals the label."""
    probs, labels = _arrays(probs, labels)
    return float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")


def nll(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true labels."""
    probs, labels = _arrays(probs, labels)
    if not len(labels):
        return float("nan")
    log_p = np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))  # all <= 0
    return float(abs(log_p.mean()))  # abs: -0.0 (log 1 negated) would print as "-0.0000"


def reliability(probs: Any, labels: Any, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per equal-width confidence bin: count, mean confidence and accuracy."""
    probs, labels = _arrays(probs, labels)
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count, conf, acc = [], [], []
    for b in range(bins):
        in_bin = which == b
        count.append(int(in_bin.sum()))
        conf.append(float(confidence[in_bin].mean()) if in_bin.any() else 0.0)
        acc.append(float(correct[in_bin].mean()) if in_bin.any() else 0.0)
    return {"edges": edges.tolist(), "count": count, "confidence": conf, "accuracy": acc}


def ece(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (n_b / N) * |acc_b - conf_b|."""
    table = reliability(probs, labels, bins)
    total = sum(table["count"])
    if not total:
        return float("nan")
    return float(
        sum(
            n / total * abs(a - c)
            for n, a, c in zip(table["count"], table["accuracy"], table["confidence"])
        )
    )


def agreement_matrix(predictions: Any) -> np.ndarray:
    """``[K, K]`` fraction of rows on which teachers i and j have the same argmax.

    ``predictions`` is ``[K, N]`` of class indices.
    """
    predictions = np.asarray(predictions)
    return (predictions[:, None, :] == predictions[None, :, :]).mean(-1)
