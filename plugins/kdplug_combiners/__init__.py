"""Combiners: turn K teachers' logits into per-row teacher weights and one soft target.

A combiner is called as ``combiner(logits [K, B, C], known [K, C], labels [B],
temperature)`` and returns ``(weights [K, B], target [B, C])``. Weights come from the
teachers' probabilities at temperature 1; the target mixes their probabilities at
``temperature``. ``auto`` is fitted on labeled rows first (its ``fit`` method, called by
the engines) and has a ``predict`` (the calibrated pool) besides its target. See
docs/combiners.md.
"""

from __future__ import annotations

import kdplug

__version__ = kdplug.__version__


def mean():
    """Average of the teachers' probabilities (equal weights)."""
    from kdplug_combiners.equal import Mean

    return Mean()


def mean_logits():
    """Softmax of the teachers' average log-probabilities (equal weights)."""
    from kdplug_combiners.equal import MeanLogits

    return MeanLogits()


def weighted(weights: list[float] | None = None):
    """Fixed teacher weights, e.g. weighted:weights=0.5;0.3;0.2 (normalized to sum 1)."""
    from kdplug_combiners.fixed import Weighted

    return Weighted(weights=weights)


def entropy():
    """EBKD: lower-entropy (more confident) teachers weigh more, per row."""
    from kdplug_combiners.confidence import Entropy

    return Entropy()


def ca_mkd():
    """CA-MKD: weights from each teacher's cross-entropy on the label (entropy if unlabeled)."""
    from kdplug_combiners.confidence import ConfidenceAware

    return ConfidenceAware()


def best():
    """Per row, all weight on the teacher with the highest max-probability."""
    from kdplug_combiners.confidence import Best

    return Best()


def auto(
    per_class: bool = False,
    pool: str = "cv",
    folds: int = 5,
    reg: float = 1.0,
    fit_values: int = 2_000_000,
):
    """Fitted on labeled rows: calibrated teachers, NLL-fitted weights, cross-validated pool.

    A fit's cost grows with rows x classes: ``fit_values`` bounds it (by default as 20,000
    rows of 100 classes do, kdplug.fitting.FIT_ROWS: 2,000 rows at 1,000 classes)."""
    from kdplug_combiners.fitted import Auto

    return Auto(per_class=per_class, pool=pool, folds=folds, reg=reg, fit_values=fit_values)


@kdplug.hookimpl
def register_combiners(register):
    register("mean", mean)
    register("mean-logits", mean_logits)
    register("weighted", weighted)
    register("entropy", entropy)
    register("ca-mkd", ca_mkd)
    register("best", best)
    register("auto", auto)
