"""Loading a fitted estimator safely and running it as a teacher on flattened inputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug.api import (
    PICKLE_SUFFIXES,
    BadRowsError,
    UntrustedTypes,
    UsageError,
    class_names,
    existing_file,
    file_hash,
    pickle_allowed,
    probs_to_logits,
    refuse_pickle,
    to_device,
)

log = logging.getLogger("kdplug")

# attributes where estimators keep their training rows' feature means or centroids:
# StandardScaler, GaussianNB, LDA/QDA, NearestCentroid, KMeans-like
FITTED_MEANS = ("mean_", "theta_", "means_", "centroids_", "cluster_centers_")
SCALE_GAP = 10.0  # a ratio of mean magnitudes this large is another scale, not other data


class EstimatorTeacher:
    """``teacher(x [B, ...]) -> logits [B, C]``: the estimator on ``x`` flattened to ``[B, D]``.

    predict_proba outputs are probabilities and become ``log p`` (zeros as IMPOSSIBLE);
    decision_function scores are used as logits (binary scores ``s`` as ``[0, s]``).
    """

    def __init__(
        self,
        estimator: Any,
        classes: list[str],
        fingerprint: str,
        source: str,
        scale: float = 1.0,
    ):
        self.estimator = estimator
        self.classes = classes
        self.fingerprint = fingerprint
        self.source = source
        self.scale = scale
        self.probs = hasattr(estimator, "predict_proba")
        self.features = getattr(estimator, "n_features_in_", None)
        self.checked = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(len(x), -1).float().cpu().numpy()
        if self.features is not None and rows.shape[1] != self.features:
            raise UsageError(
                f"{self.source} expects {self.features} features, the data gives "
                f"{rows.shape[1]} per row (x flattened from {tuple(x.shape[1:])})"
            )
        if self.scale != 1.0:
            rows = rows * np.float32(self.scale)
        if not self.checked:
            self.checked = True
            check_scale(self, rows, images=x.dim() > 2)
        try:
            if self.probs:
                out = np.asarray(self.estimator.predict_proba(rows), np.float32)
                return to_device(probs_to_logits(torch.from_numpy(out)), x.device)
            scores = np.asarray(self.estimator.decision_function(rows), dtype=np.float32)
        except ValueError:
            missing = np.flatnonzero(~np.isfinite(rows).all(axis=1))
            if not len(missing):
                raise
            raise BadRowsError(
                f"{self.source}: {type(self.estimator).__name__} does not accept missing "
                "(NaN) or infinite feature values, which rows {rows} hold; fill or drop "
                "them in the data",
                missing,
            ) from None
        if scores.ndim == 1:
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        return to_device(torch.from_numpy(scores), x.device)


def check_scale(teacher: EstimatorTeacher, rows: np.ndarray, images: bool) -> None:
    """Say what the estimator is fed, and warn when the features it was fitted on (as far
    as it keeps them: ``training_means``) are on another scale than the first batch's."""
    if images or teacher.scale != 1.0:  # feature rows at scale 1: nothing was chosen
        fed = f"{rows.shape[1]} features" + (" (image pixels in [0, 1])" if images else "")
        log.info("%s is fed %s times scale=%g", teacher.source, fed, teacher.scale)
    fitted = training_means(teacher.estimator)
    finite = rows[np.isfinite(rows).all(axis=1)]
    if fitted is None or not len(finite):
        return
    trained, given = float(np.abs(fitted).mean()), float(np.abs(finite).mean())
    if trained > 0 and given > 0 and max(trained, given) / min(trained, given) >= SCALE_GAP:
        log.warning(
            "%s was fitted on features of mean magnitude %.3g but is fed %.3g (times "
            "scale=%g); if its training data was on another scale (e.g. 0-255 pixels), set "
            "scale= on its spec (e.g. scale=%.3g)",
            teacher.source,
            trained,
            given,
            teacher.scale,
            teacher.scale * trained / given,
        )


def training_means(estimator: Any) -> np.ndarray | None:
    """The per-feature means (or centroids) of the rows ``estimator`` was fitted on, where
    it keeps them: its first step when a Pipeline; None otherwise."""
    steps = getattr(estimator, "steps", None)
    if steps:
        estimator = steps[0][1]
    for attribute in FITTED_MEANS:
        value = getattr(estimator, attribute, None)
        if value is not None:
            return np.asarray(value, dtype=np.float64)
    return None


def load_estimator(
    ref: str, allow_pickle: bool, trusted: Any, classes: Any, scale: float = 1.0
) -> EstimatorTeacher:
    """Load ``ref`` (.skops, or a pickle with the opt-in) and check it is a fitted classifier."""
    source = f"sklearn:{ref}"
    path = existing_file(ref, "sklearn")
    suffix = path.suffix.lower()
    if suffix == ".skops":
        estimator = _load_skops(path, source, allow_pickle, trusted)
    elif suffix in PICKLE_SUFFIXES:
        if not pickle_allowed(allow_pickle):
            raise refuse_pickle(source, path, ".skops (skops.io.dump)")
        estimator = _load_pickle(path, source)
    else:
        raise UsageError(
            f"{source}: unknown file type {suffix!r}; use .skops (safe) or "
            f"{'/'.join(PICKLE_SUFFIXES)} (pickle, opt-in)"
        )
    if not (hasattr(estimator, "predict_proba") or hasattr(estimator, "decision_function")):
        raise UsageError(
            f"{source}: holds a {type(estimator).__name__}, not an estimator with "
            "predict_proba or decision_function"
        )
    own = getattr(estimator, "classes_", None)
    if own is None:
        raise UsageError(f"{source}: the estimator is not fitted (it has no classes_)")
    names = class_names(classes, source) or [str(c) for c in own]
    if len(names) != len(own):
        raise UsageError(
            f"{source}: {len(names)} class names given but the estimator has {len(own)} classes"
        )
    if not (np.isfinite(scale) and scale > 0):
        raise UsageError(f"{source}: scale must be a finite number > 0, got {scale}")
    return EstimatorTeacher(estimator, names, file_hash(path), source, scale)


def _load_skops(path: Path, source: str, allow_pickle: bool, trusted: Any) -> Any:
    import skops.io

    allowed = [
        str(t) for t in (trusted if isinstance(trusted, list) else [trusted] if trusted else [])
    ]
    try:
        needed = skops.io.get_untrusted_types(file=path)
        refused = [t for t in needed if t not in allowed]
        if refused and not pickle_allowed(allow_pickle):
            raise UntrustedTypes(source, refused)
        return skops.io.load(path, trusted=needed or None)
    except UsageError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, KeyError, json errors for a bad file
        raise UsageError(
            f"{source}: cannot read {path} as a skops file (corrupt or truncated): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _load_pickle(path: Path, source: str) -> Any:
    import joblib

    try:
        return joblib.load(path)
    except Exception as exc:
        raise UsageError(
            f"{source}: cannot unpickle {path} (corrupt, truncated, or made with other "
            f"library versions): {type(exc).__name__}: {exc}"
        ) from None
