"""PATE with the GNMax aggregator (Papernot et al. 2017, 2018) and its privacy cost.

Each row is one query: the teachers' vote histogram ``n [C]`` is answered with
``argmax_c (n_c + N(0, sigma^2))``. With a ``threshold``, Confident-GNMax first checks
``max_c n_c + N(0, sigma1^2) >= threshold`` and leaves the row unlabeled otherwise.

Privacy (data-independent Renyi-DP bound): an answer is ``(lam, lam / sigma^2)``-RDP (the
histogram's L2 sensitivity is sqrt 2); each threshold check, answered or not, costs
``lam / (2 sigma1^2)``. RDP adds up over queries to ``RDP(lam) = a * lam`` and converts to
``eps = min_{lam > 1} [a * lam + log(1/delta) / (lam - 1)] = a + 2 sqrt(a log(1/delta))``
at ``lam* = 1 + sqrt(log(1/delta) / a)``.
"""

from __future__ import annotations

import math

import torch

from kdplug.api import Labels
from kdplug_label_generators.confidence import votes


def gaussian_rdp_slope(answered: int, queries: int, sigma: float, sigma1: float | None) -> float:
    """``a`` with ``RDP(lam) = a * lam`` for ``answered`` GNMax answers among ``queries``."""
    slope = answered / sigma**2
    if sigma1 is not None:
        slope += queries / (2.0 * sigma1**2)
    return slope


def rdp_to_epsilon(slope: float, delta: float) -> tuple[float, float | None]:
    """``(eps, lam*)`` minimizing ``slope * lam + log(1/delta) / (lam - 1)`` over lam > 1
    (``lam*`` is None when nothing was spent: eps is then 0)."""
    log_inv_delta = math.log(1.0 / delta)
    if slope == 0:
        return 0.0, None
    order = 1.0 + math.sqrt(log_inv_delta / slope)
    return slope + 2.0 * math.sqrt(slope * log_inv_delta), order


class Pate:
    """Noisy-argmax labels of the teacher votes; rows the threshold check refuses get -1.

    ``probs`` holds only what is released: one-hot of the noisy answer, uniform where
    unanswered. ``private = True`` tells the label engine not to write per-row teacher
    statistics (the ``agreement`` column) next to them.
    """

    private = True

    def __init__(
        self, sigma: float, threshold: float | None, sigma1: float | None, seed: int, delta: float
    ):
        self.sigma = sigma
        self.threshold = threshold
        self.sigma1 = sigma1
        self.seed = seed
        self.delta = delta

    def __call__(self, target, teacher_probs, known) -> Labels:
        K, N, C = teacher_probs.shape
        counts = torch.nn.functional.one_hot(votes(teacher_probs), C).sum(0).double()  # [N, C]
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(N, C, generator=generator, dtype=torch.float64)
        check_noise = torch.randn(N, generator=generator, dtype=torch.float64)
        answered = torch.ones(N, dtype=torch.bool)
        if self.threshold is not None:
            answered = counts.max(1).values + self.sigma1 * check_noise >= self.threshold
        noisy = (counts + self.sigma * noise).argmax(1)
        label = torch.where(answered, noisy, torch.full_like(noisy, -1))
        probs = torch.full((N, C), 1.0 / C, dtype=target.dtype)
        probs[answered] = torch.nn.functional.one_hot(noisy[answered], C).to(target.dtype)
        n_answered = int(answered.sum())
        slope = gaussian_rdp_slope(n_answered, N, self.sigma, self.sigma1)
        epsilon, order = rdp_to_epsilon(slope, self.delta)
        return Labels(
            label,
            answered,
            probs,
            {
                "epsilon": epsilon,
                "delta": self.delta,
                "rdp_order": order,
                "queries": N,
                "answered": n_answered,
                "noise_changed_votes": int((noisy != counts.argmax(1))[answered].sum()),
            },
        )
