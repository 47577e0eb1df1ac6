"""Label generators: turn the combined teacher target into pseudo-labels.

Every generator is called once on all rows: ``generator(target [N, C], teacher_probs
[K, N, C], known [K, C]) -> kdplug.Labels``. The option names, types and defaults live in
the factories below; the implementations are in the submodules (which import torch).
"""

from __future__ import annotations

import kdplug
from kdplug.api import UsageError

__version__ = kdplug.__version__


def _unit(name: str, option: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{name}: {option} must be in [0, 1], got {value}")


def _positive(name: str, option: str, value: float) -> None:
    if not value > 0:
        raise UsageError(f"{name}: {option} must be > 0, got {value}")


def threshold(
    tau: float = 0.95, floor: float = 0.0, accuracy: float | None = None, class_rows: int = 30
):
    """Hard label where the combined confidence max p >= tau (FixMatch's tau = 0.95); floor:
    every class keeps its most confident fraction; accuracy: thresholds picked on labeled rows."""
    from kdplug_label_generators.confidence import PickedThreshold, Threshold

    _unit("threshold", "tau", tau)
    _unit("threshold", "floor", floor)
    if accuracy is None:
        return Threshold(tau, floor)
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float):
        raise UsageError(f"threshold: accuracy must be a number, got {accuracy!r}")
    if not 0.0 < accuracy <= 1.0:
        raise UsageError(f"threshold: accuracy must be in (0, 1], got {accuracy}")
    if class_rows < 1:
        raise UsageError(f"threshold: class_rows must be >= 1, got {class_rows}")
    return PickedThreshold(float(accuracy), class_rows, floor)


def soft(T: float = 0.5):
    """Keep every row with its soft label sharpened as p^(1/T) (MixMatch's T = 0.5)."""
    from kdplug_label_generators.confidence import Soft

    _positive("soft", "T", T)
    return Soft(T)


def topk(k: int = 5):
    """Keep every row with only its k most likely classes, renormalized (FKD's k = 5)."""
    from kdplug_label_generators.confidence import TopK

    if k < 1:
        raise UsageError(f"topk: k must be >= 1, got {k}")
    return TopK(k)


def class_balanced(
    per_class: int | None = None, quantile: float | None = None, min_confidence: float = 0.3
):
    """At most per_class rows (or the top quantile) per class, most confident first."""
    from kdplug_label_generators.confidence import ClassBalanced

    if per_class is not None and quantile is not None:
        raise UsageError("class-balanced: give per_class or quantile, not both")
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int)):
        raise UsageError(f"class-balanced: per_class must be an int, got {per_class!r}")
    if per_class is not None and per_class < 1:
        raise UsageError(f"class-balanced: per_class must be >= 1, got {per_class}")
    if quantile is not None:
        if isinstance(quantile, bool) or not isinstance(quantile, int | float):
            raise UsageError(f"class-balanced: quantile must be a number, got {quantile!r}")
        if not 0.0 < quantile <= 1.0:
            raise UsageError(f"class-balanced: quantile must be in (0, 1], got {quantile}")
    _unit("class-balanced", "min_confidence", min_confidence)
    return ClassBalanced(per_class, None if quantile is None else float(quantile), min_confidence)


def adaptive(tau: float = 0.95, min_tau: float = 0.5, warmup: bool = False):
    """FlexMatch class thresholds: tau scaled down for classes the teachers find hard."""
    from kdplug_label_generators.confidence import Adaptive

    _unit("adaptive", "tau", tau)
    _unit("adaptive", "min_tau", min_tau)
    if min_tau > tau:
        raise UsageError(f"adaptive: min_tau must be <= tau ({tau}), got {min_tau}")
    return Adaptive(tau, min_tau, warmup)


def agreement(min_agree: int = 2):
    """Hard label where at least min_agree teachers' argmax equals the combined label."""
    from kdplug_label_generators.confidence import Agreement

    if min_agree < 1:
        raise UsageError(f"agreement: min_agree must be >= 1, got {min_agree}")
    return Agreement(min_agree)


def dawid_skene(
    soft: bool = True,
    max_iter: int = 100,
    tol: float = 1e-4,
    smoothing: float = 0.01,
    tau: float = 0.0,
    init: str = "vote",
):
    """Dawid-Skene EM over per-teacher confusion matrices; needs no ground truth."""
    from kdplug_label_generators.dawid_skene_em import INITS, DawidSkene

    if max_iter < 1:
        raise UsageError(f"dawid-skene: max_iter must be >= 1, got {max_iter}")
    _positive("dawid-skene", "tol", tol)
    _positive("dawid-skene", "smoothing", smoothing)
    _unit("dawid-skene", "tau", tau)
    if init not in INITS:
        raise UsageError(f"dawid-skene: init must be vote or mean, got {init!r}")
    return DawidSkene(soft, max_iter, tol, smoothing, tau, init)


def pate(
    sigma: float = 1.0,
    threshold: float | None = None,
    sigma1: float | None = None,
    seed: int = 0,
    delta: float = 1e-5,
):
    """PATE GNMax: noisy argmax of teacher votes, with the privacy spent (epsilon, delta)."""
    from kdplug_label_generators.gnmax import Pate

    _positive("pate", "sigma", sigma)
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float)
    ):
        raise UsageError(f"pate: threshold must be a number, got {threshold!r}")
    if sigma1 is not None:
        if threshold is None:
            raise UsageError("pate: sigma1 is the noise of the threshold check; give threshold too")
        if isinstance(sigma1, bool) or not isinstance(sigma1, int | float):
            raise UsageError(f"pate: sigma1 must be a number, got {sigma1!r}")
        _positive("pate", "sigma1", sigma1)
    if not 0.0 < delta < 1.0:
        raise UsageError(f"pate: delta must be in (0, 1), got {delta}")
    check_sigma = None if threshold is None else float(sigma1 if sigma1 is not None else sigma)
    return Pate(sigma, None if threshold is None else float(threshold), check_sigma, seed, delta)


@kdplug.hookimpl
def register_label_generators(register):
    register("threshold", threshold)
    register("soft", soft)
    register("topk", topk)
    register("class-balanced", class_balanced)
    register("adaptive", adaptive)
    register("agreement", agreement)
    register("dawid-skene", dawid_skene)
    register("pate", pate)
