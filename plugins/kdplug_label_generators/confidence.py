"""Generators that decide from the combined target's confidence (and the teachers' votes).

Shapes: ``target`` [N, C] (rows sum to 1), ``teacher_probs`` [K, N, C], ``known`` [K, C].
The confidence of a row is ``target.max()``, its class ``target.argmax()``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdplug.api import Labels, UsageError


def hard_labels(
    target: torch.Tensor, accepted: torch.Tensor, probs: torch.Tensor | None = None, **info
) -> Labels:
    """Labels with the argmax of ``target`` where ``accepted`` [N] and -1 elsewhere."""
    label = torch.where(accepted, target.argmax(1), torch.full_like(accepted, -1, dtype=torch.long))
    return Labels(label, accepted, target if probs is None else probs, info)


def votes(teacher_probs: torch.Tensor) -> torch.Tensor:
    """Each teacher's argmax ``[K, N]`` (unknown classes have probability 0, so never win)."""
    return teacher_probs.argmax(-1)


class Threshold:
    """Accept a row where its confidence is at least ``tau``."""

    def __init__(self, tau: float):
        self.tau = tau

    def __call__(self, target, teacher_probs, known) -> Labels:
        return hard_labels(target, target.max(1).values >= self.tau)


class Soft:
    """Keep every row; the soft label is ``p^(1/T)`` renormalized (T < 1 sharpens)."""

    def __init__(self, T: float):
        self.T = T

    def __call__(self, target, teacher_probs, known) -> Labels:
        sharpened = torch.softmax(torch.log(target.double()) / self.T, dim=1).to(target.dtype)
        accepted = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        return hard_labels(sharpened, accepted)


class TopK:
    """Keep every row with its ``k`` most likely classes, renormalized; written as top-k."""

    def __init__(self, k: int):
        self.topk = k

    def __call__(self, target, teacher_probs, known) -> Labels:
        k = min(self.topk, target.shape[1])
        values, indices = target.topk(k, dim=1)
        kept = torch.zeros_like(target).scatter_(1, indices, values)
        kept = kept / kept.sum(1, keepdim=True).clamp_min(1e-30)
        accepted = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        return hard_labels(kept, accepted, mass_kept=float(values.sum(1).mean()))


class ClassBalanced:
    """Noisy Student's balancing: drop rows below ``min_confidence``, then keep the most
    confident ``per_class`` rows (or top ``quantile`` fraction) of each predicted class.

    With neither option, every class keeps as many rows as the smallest non-empty class.
    """

    def __init__(self, per_class: int | None, quantile: float | None, min_confidence: float):
        self.per_class = per_class
        self.quantile = quantile
        self.min_confidence = min_confidence

    def __call__(self, target, teacher_probs, known) -> Labels:
        confidence, predicted = target.max(1)
        candidate = confidence >= self.min_confidence
        C = target.shape[1]
        counts = torch.bincount(predicted[candidate], minlength=C)
        if self.per_class is not None:
            limits = torch.full((C,), self.per_class, dtype=torch.long)
        elif self.quantile is not None:
            limits = torch.tensor([math.ceil(self.quantile * int(n)) for n in counts])
        else:
            smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0
            limits = torch.full((C,), smallest, dtype=torch.long)
        # within each class, most confident first; ties broken by row order (deterministic)
        rows = torch.arange(len(confidence))[candidate]
        order = np.lexsort(
            (rows.numpy(), -confidence[rows].double().numpy(), predicted[rows].numpy())
        )
        rows, classes = rows[order], predicted[rows][order]
        first = torch.searchsorted(classes, torch.arange(C))
        rank = torch.arange(len(rows)) - first[classes]
        accepted = torch.zeros_like(candidate)
        accepted[rows[rank < limits[classes]]] = True
        return hard_labels(
            target, accepted, candidates_per_class=counts.tolist(), limit_per_class=limits.tolist()
        )


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


class Adaptive:
    """Accept a row where its confidence reaches its class's FlexMatch threshold, which is
    never below ``min_tau``."""

    def __init__(self, tau: float, min_tau: float, warmup: bool):
        self.tau = tau
        self.min_tau = min_tau
        self.warmup = warmup

    def __call__(self, target, teacher_probs, known) -> Labels:
        confidence, predicted = target.max(1)
        flex, sigma = flexmatch_thresholds(
            confidence.double(), predicted, target.shape[1], self.tau, self.warmup
        )
        thresholds = flex.clamp_min(self.min_tau)
        accepted = confidence.double() >= thresholds[predicted]
        return hard_labels(
            target, accepted, thresholds=thresholds.tolist(), confident_per_class=sigma.tolist()
        )


class Agreement:
    """Accept a row where at least ``min_agree`` teachers' argmax equals its class."""

    def __init__(self, min_agree: int):
        self.min_agree = min_agree

    def __call__(self, target, teacher_probs, known) -> Labels:
        K = teacher_probs.shape[0]
        if self.min_agree > K:
            raise UsageError(f"agreement: min_agree={self.min_agree} but the run has {K} teachers")
        agree = (votes(teacher_probs) == target.argmax(1)).sum(0)
        return hard_labels(target, agree >= self.min_agree)
