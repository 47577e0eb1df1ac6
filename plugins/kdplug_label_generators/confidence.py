"""Generators that decide from the combined target's confidence (and the teachers' votes).

Each is a streaming generator (``kdplug.api.StreamingGenerator``): ``decide(rows)`` labels
one shard's rows (``rows.target [R, C]``, ``rows.votes [K, R]``); those that need figures
over all rows (a class's rows, counts) gather them in ``prepare(shards)`` from
``shards.scores()``, each row's confidence ``target.max()`` and class ``target.argmax()``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from kdplug.api import (
    Labels,
    LabelShards,
    ShardRows,
    StreamingGenerator,
    UsageError,
    argmax,
    hard_labels,
)

log = logging.getLogger("kdplug")


def pick_threshold(confidence: torch.Tensor, correct: torch.Tensor, accuracy: float) -> float:
    """The lowest confidence ``t`` at which the rows with confidence >= ``t`` are at least
    ``accuracy`` accurate: the widest coverage that meets it (``inf`` when none does).

    ``confidence [M]``, ``correct [M]`` bool. Rows of equal confidence go in or out
    together, so ``t`` is always the confidence of the last row of such a run."""
    if not len(confidence):
        return math.inf
    conf, order = confidence.double().sort(descending=True, stable=True)
    right = correct[order].double().cumsum(0)
    running = right / torch.arange(1, len(conf) + 1, dtype=torch.float64)
    last = torch.ones(len(conf), dtype=torch.bool)
    last[:-1] = conf[1:] < conf[:-1]
    good = ((running >= accuracy - 1e-12) & last).nonzero().flatten()
    return float(conf[good[-1]]) if len(good) else math.inf


def floored(
    confidence: torch.Tensor, predicted: torch.Tensor, thresholds: torch.Tensor, floor: float
) -> torch.Tensor:
    """``thresholds [C]`` with each class's lowered, where needed, so that at least
    ``ceil(floor * n_c)`` of the ``n_c`` rows predicted as it reach it: to the confidence
    of its ``ceil(floor * n_c)``-th most confident row. A class no row is predicted as
    keeps its threshold."""
    out = thresholds.clone()
    order, first = by_class(confidence, predicted, len(thresholds))
    keep = torch.ceil(floor * torch.bincount(predicted, minlength=len(thresholds)).double())
    has = keep > 0
    kth = confidence.double()[order][first[has] + keep[has].long() - 1]
    out[has] = torch.minimum(out[has], kth)
    return out


def by_class(
    confidence: torch.Tensor, predicted: torch.Tensor, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows sorted by class, most confident first within a class and ties in row order
    (``order [N]``), and where each class starts in that order (``first [C]``)."""
    order = torch.from_numpy(np.lexsort((-confidence.double().numpy(), predicted.numpy())))
    return order, torch.searchsorted(predicted[order], torch.arange(C))


def finite(values: torch.Tensor) -> list[float | None]:
    """A threshold list for JSON: ``None`` where no threshold is reachable (``inf``)."""
    return [None if math.isinf(v) else v for v in values.tolist()]


class Threshold(StreamingGenerator):
    """Accept a row where its confidence reaches ``tau``; with ``floor`` > 0, every class
    keeps at least its most confident ``floor`` fraction of the rows predicted as it."""

    def __init__(self, tau: float, floor: float = 0.0):
        self.tau = tau
        self.floor = floor
        self.thresholds: torch.Tensor | None = None
        self.info: dict = {}

    def class_thresholds(self, C: int) -> torch.Tensor:
        """The thresholds ``[C]`` before the floor (float64)."""
        return torch.full((C,), self.tau, dtype=torch.float64)

    def prepare(self, shards: LabelShards) -> None:
        before = self.class_thresholds(shards.classes)
        self.thresholds, self.info = before, self.picked_info()
        if self.floor <= 0:
            return
        self.thresholds = floored(*shards.scores(), before, self.floor)
        lowered = (self.thresholds < before).nonzero().flatten().tolist()
        self.info = {**self.info, "thresholds": finite(self.thresholds), "floored": lowered}
        if lowered:
            log.info(
                "threshold: at classes %s (positions in the run's classes) fewer than "
                "%g of the rows predicted as the class reached its threshold; floor=%g "
                "lowered those thresholds to %s",
                lowered[:20],
                self.floor,
                self.floor,
                ", ".join(f"{float(self.thresholds[c]):.3f}" for c in lowered[:20]),
            )

    def picked_info(self) -> dict:
        return {}

    def decide(self, rows: ShardRows) -> Labels:
        confidence, predicted = rows.target.amax(1), argmax(rows.target)
        return hard_labels(rows.target, confidence.double() >= self.thresholds[predicted])

    def summary(self) -> dict:
        return self.info


class PickedThreshold(Threshold):
    """``threshold,accuracy=A``: the thresholds are picked by ``fit`` on labeled rows so
    that the rows they accept there are at least ``A`` accurate; a class with at least
    ``class_rows`` labeled rows predicted as it gets its own, the others share one."""

    def __init__(self, accuracy: float, class_rows: int, floor: float = 0.0):
        super().__init__(tau=math.nan, floor=floor)
        self.accuracy = accuracy
        self.class_rows = class_rows
        self.picked: torch.Tensor | None = None

    def fit(self, prediction: torch.Tensor, labels: torch.Tensor) -> dict:
        """Pick the thresholds on ``prediction [M, C]`` (the combined prediction of labeled
        rows) and their ``labels [M]``; returns what was picked (JSON-ready)."""
        keep = labels >= 0
        confidence, predicted = prediction[keep].max(1)
        labels = labels[keep]
        correct = predicted == labels
        shared = pick_threshold(confidence, correct, self.accuracy)
        C = prediction.shape[1]
        picked = torch.full((C,), shared, dtype=torch.float64)
        counts = torch.bincount(predicted, minlength=C)
        own = (counts >= self.class_rows).nonzero().flatten().tolist()
        for c in own:
            mine = predicted == c
            picked[c] = pick_threshold(confidence[mine], correct[mine], self.accuracy)
        self.picked = picked
        accepted = confidence.double() >= picked[predicted]
        return {
            "accuracy": self.accuracy,
            "rows": int(keep.sum()),
            "threshold": None if math.isinf(shared) else shared,
            "thresholds": finite(picked),
            "own_threshold": own,
            "rows_per_class": counts.tolist(),
            "coverage_on_fit_rows": float(accepted.double().mean()) if len(accepted) else None,
            "accuracy_on_fit_rows": float(correct[accepted].double().mean())
            if accepted.any()
            else None,
        }

    def class_thresholds(self, C: int) -> torch.Tensor:
        if self.picked is None:
            raise UsageError(
                f"threshold: accuracy={self.accuracy} picks its thresholds on labeled rows, "
                "and none were given (kdplug label calls its fit with them)"
            )
        return self.picked

    def picked_info(self) -> dict:
        return {"thresholds": finite(self.picked)}


class Soft(StreamingGenerator):
    """Keep every row; the soft label is ``p^(1/T)`` renormalized (T < 1 sharpens)."""

    def __init__(self, T: float):
        self.T = T

    def decide(self, rows: ShardRows) -> Labels:
        target = rows.target
        sharpened = torch.softmax(torch.log(target.double()) / self.T, dim=1).to(target.dtype)
        return hard_labels(sharpened, torch.ones(len(rows), dtype=torch.bool))


class TopK(StreamingGenerator):
    """Keep every row with its ``k`` most likely classes, renormalized; written as top-k."""

    def __init__(self, k: int):
        self.topk = k
        self.mass = torch.zeros((), dtype=torch.float64)
        self.rows = 0

    def prepare(self, shards: LabelShards) -> None:
        self.mass, self.rows = torch.zeros((), dtype=torch.float64), 0

    def decide(self, rows: ShardRows) -> Labels:
        target = rows.target
        k = min(self.topk, target.shape[1])
        values, indices = target.topk(k, dim=1)
        kept = torch.zeros_like(target).scatter_(1, indices, values)
        kept = kept / kept.sum(1, keepdim=True).clamp_min(1e-30)
        self.mass += values.sum(1).double().sum()
        self.rows += len(rows)
        return hard_labels(kept, torch.ones(len(rows), dtype=torch.bool))

    def summary(self) -> dict:
        return {"mass_kept": float(self.mass / max(self.rows, 1))}


class ClassBalanced(StreamingGenerator):
    """Noisy Student's balancing: drop rows below ``min_confidence``, then keep the most
    confident ``per_class`` rows (or top ``quantile`` fraction) of each predicted class.

    With neither option, every class keeps as many rows as the smallest non-empty class.
    Ties are broken by row order, so ``prepare`` ranks every row (16 bytes a row).
    """

    def __init__(self, per_class: int | None, quantile: float | None, min_confidence: float):
        self.per_class = per_class
        self.quantile = quantile
        self.min_confidence = min_confidence
        self.accepted = torch.zeros(0, dtype=torch.bool)
        self.info: dict = {}
        self.offset = 0

    def prepare(self, shards: LabelShards) -> None:
        confidence, predicted = shards.scores()
        candidate = confidence >= self.min_confidence
        C = shards.classes
        counts = torch.bincount(predicted[candidate], minlength=C)
        if self.per_class is not None:
            limits = torch.full((C,), self.per_class, dtype=torch.long)
        elif self.quantile is not None:
            limits = torch.ceil(self.quantile * counts.double()).long()
        else:
            smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0
            limits = torch.full((C,), smallest, dtype=torch.long)
        # within each class, most confident first; ties broken by row order (deterministic)
        rows = torch.arange(len(confidence))[candidate]
        order, first = by_class(confidence[rows], predicted[rows], C)
        rows, classes = rows[order], predicted[rows][order]
        rank = torch.arange(len(rows)) - first[classes]
        self.accepted = torch.zeros_like(candidate)
        self.accepted[rows[rank < limits[classes]]] = True
        self.info = {"candidates_per_class": counts.tolist(), "limit_per_class": limits.tolist()}
        self.offset = 0

    def decide(self, rows: ShardRows) -> Labels:
        start, self.offset = self.offset, self.offset + len(rows)
        return hard_labels(rows.target, self.accepted[start : self.offset])

    def summary(self) -> dict:
        return self.info


def flexmatch_thresholds(
    confidence: torch.Tensor, predicted: torch.Tensor, C: int, tau: float, warmup: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexMatch: ``sigma(c)`` = rows predicted c with confidence > tau;
    ``beta(c) = sigma(c) / max(max_c sigma, N_unused if warmup)``; ``T(c) = M(beta) * tau``
    with ``M(x) = x / (2 - x)``. Returns ``(T [C], sigma [C])``."""
    sigma = torch.bincount(predicted[confidence > tau], minlength=C).double()
    scale = sigma.max()
    if warmup:
        scale = torch.maximum(scale, (confidence <= tau).sum().double())
    beta = sigma / scale if scale > 0 else torch.zeros_like(sigma)
    return beta / (2.0 - beta) * tau, sigma.long()


class Adaptive(StreamingGenerator):
    """Accept a row where its confidence reaches its class's FlexMatch threshold, which is
    never below ``min_tau``."""

    def __init__(self, tau: float, min_tau: float, warmup: bool):
        self.tau = tau
        self.min_tau = min_tau
        self.warmup = warmup
        self.thresholds = torch.zeros(0, dtype=torch.float64)
        self.sigma = torch.zeros(0, dtype=torch.long)

    def prepare(self, shards: LabelShards) -> None:
        confidence, predicted = shards.scores()
        flex, self.sigma = flexmatch_thresholds(
            confidence, predicted, shards.classes, self.tau, self.warmup
        )
        self.thresholds = flex.clamp_min(self.min_tau)

    def decide(self, rows: ShardRows) -> Labels:
        confidence, predicted = rows.target.amax(1), argmax(rows.target)
        return hard_labels(rows.target, confidence.double() >= self.thresholds[predicted])

    def summary(self) -> dict:
        return {"thresholds": self.thresholds.tolist(), "confident_per_class": self.sigma.tolist()}


class Agreement(StreamingGenerator):
    """Accept a row where at least ``min_agree`` teachers' argmax equals its class."""

    def __init__(self, min_agree: int):
        self.min_agree = min_agree

    def prepare(self, shards: LabelShards) -> None:
        K = len(shards.known)
        if self.min_agree > K:
            raise UsageError(f"agreement: min_agree={self.min_agree} but the run has {K} teachers")

    def decide(self, rows: ShardRows) -> Labels:
        agree = (rows.votes == argmax(rows.target)).sum(0)
        return hard_labels(rows.target, agree >= self.min_agree)
