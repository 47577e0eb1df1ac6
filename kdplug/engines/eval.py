"""Predicting with a model over a data source, and the evaluation report of ``kdplug eval``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug import metrics
from kdplug.data import batches
from kdplug.device import autocast
from kdplug.errors import UsageError

log = logging.getLogger("kdplug")


@torch.inference_mode()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[N, C]`` (float32) and labels ``[N]`` (-1 unknown) of every batch
    ``(x, y, idx)`` of ``loader``."""
    probs, labels = [], []
    for x, y, _ in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        labels.append(y)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def report(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, NLL, ECE, per-class accuracy and the confusion matrix of the labeled rows."""
    from sklearn.metrics import confusion_matrix

    labeled = labels >= 0
    if not labeled.any():
        raise UsageError("the data has no labeled rows to evaluate on")
    y, predicted = labels[labeled], probs[labeled].argmax(1)
    matrix = confusion_matrix(y, predicted, labels=list(range(len(classes))))
    per_class = {
        name: (float(matrix[c, c] / matrix[c].sum()) if matrix[c].sum() else None)
        for c, name in enumerate(classes)
    }
    return {
        "rows": int(len(labels)),
        "labeled_rows": int(labeled.sum()),
        "accuracy": metrics.accuracy(probs, labels),
        "nll": metrics.nll(probs, labels),
        "ece": metrics.ece(probs, labels),
        "per_class_accuracy": per_class,
        "classes": list(classes),
        "confusion_matrix": matrix.tolist(),
    }


def plot_confusion(matrix: list[list[int]], classes: list[str], path: str | os.PathLike) -> None:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG."""
    from kdplug.reports.figures import new_figure, save_figure

    matrix = np.asarray(matrix)
    n = len(classes)
    size = min(4 + 0.35 * n, 20)
    fig, ax = new_figure(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for (i, j), count in np.ndenumerate(matrix):
            if n <= 20 and count:
                dark = count > matrix.max() / 2
                ax.text(j, i, int(count), ha="center", va="center", color="w" if dark else "k")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    save_figure(fig, Path(path))


def check_readable(config: dict[str, Any], source: Any, data: str) -> None:
    """The student of ``config`` reads ``source``'s rows: images for an image student,
    feature rows of its feature count for a tabular one (``data_kind``)."""
    from kdplug.model_dir import is_tabular

    if not is_tabular(config):
        if source.kind != "image":
            raise UsageError(
                f"{data}: the student takes images; this dataset is tabular (a tabular "
                "student: --student tabular:mlp)"
            )
        return
    count, names = config["in_chans"], config.get("feature_names")
    if source.kind != "tabular":
        raise UsageError(
            f"{data}: the student takes tabular rows of {count} features; this dataset holds images"
        )
    if len(source.input_columns) != count:
        raise UsageError(
            f"{data}: the student takes {count} features {names}; this dataset has "
            f"{len(source.input_columns)} {source.input_columns}"
        )
    if names and list(names) != source.input_columns:
        log.warning(
            "%s's features are named %s, the student's %s: they are matched by position",
            data,
            source.input_columns,
            names,
        )


def evaluate_student(
    model_dir: str,
    data: str,
    batch_size: int = 256,
    device: str = "auto",
    workers: int | None = None,
) -> dict[str, Any]:
    """Evaluate the student directory ``model_dir`` on the DATA spec ``data``."""
    from kdplug.data import load_data
    from kdplug.device import pick_device
    from kdplug.model_dir import load_classifier, read_config

    config = read_config(model_dir)
    source = load_data(data, classes=config["classes"])
    check_readable(config, source, data)
    if source.label_column is None:
        raise UsageError(f"{data}: no label column to evaluate on (columns: {source.columns})")
    if not (source.labels() >= 0).any():
        raise UsageError(f"{data}: no rows labeled with the model's classes to evaluate on")
    classifier = load_classifier(model_dir)
    target = pick_device(device)
    loader = batches(source, batch_size, workers=workers, pin_memory=target.type == "cuda")
    probs, labels = predict(classifier.to(target), loader, target)
    scores = report(probs, labels, classifier.classes)
    return {"model": str(model_dir), "data": data, "data_split": source.split, **scores}
