"""PATE with the GNMax aggregator (Papernot et al. 2017, 2018) and its privacy cost.

Each row is one query: the teachers' vote histogram ``n [C]`` is answered with
``argmax_c (n_c + N(0, sigma^2))``. With a ``threshold``, Confident-GNMax first checks
``max_c n_c + N(0, sigma1^2) >= threshold`` and leaves the row unlabeled otherwise.

Privacy (data-independent Renyi-DP bound): an answer is ``(lam, lam / sigma^2)``-RDP (the
histogram's L2 sensitivity is sqrt 2); each threshold check, answered or not, costs
``lam / (2 sigma1^2)``. RDP adds up over queries to ``RDP(lam) = a * lam`` and converts to
``eps = min_{lam > 1} [a * lam + log(1/delta) / (lam - 1)] = a + 2 sqrt(a log(1/delta))``
at ``lam* = 1 + sqrt(log(1/delta) / a)``.

The noise of a row depends on its position in DATA and ``seed`` only (blocks of
``NOISE_BLOCK`` rows share one seeded generator), so a run decides the same whatever its
shards.
"""

from __future__ import annotations

import math

import torch

from kdplug.api import Labels, LabelShards, ShardRows, StreamingGenerator

NOISE_BLOCK = 4096


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


def row_noise(index: torch.Tensor, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal noise for the rows at positions ``index [R]`` (ascending): ``[R, C]``
    for the votes and ``[R]`` for the threshold check, the same for a row in any batch."""
    votes_noise = torch.empty(len(index), C, dtype=torch.float64)
    check_noise = torch.empty(len(index), dtype=torch.float64)
    blocks = torch.div(index, NOISE_BLOCK, rounding_mode="floor")
    for block in blocks.unique().tolist():
        mine = blocks == block
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        noise = torch.randn(NOISE_BLOCK, C + 1, generator=generator, dtype=torch.float64)
        offsets = index[mine] - block * NOISE_BLOCK
        votes_noise[mine], check_noise[mine] = noise[offsets, :C], noise[offsets, C]
    return votes_noise, check_noise


class Pate(StreamingGenerator):
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
        self.queries = self.answered = self.changed = 0

    def prepare(self, shards: LabelShards) -> None:
        self.queries = self.answered = self.changed = 0

    def decide(self, rows: ShardRows) -> Labels:
        K, R = rows.votes.shape
        C = rows.target.shape[1]
        counts = torch.zeros(R, C, dtype=torch.float64)
        counts.scatter_add_(1, rows.votes.T, torch.ones(R, K, dtype=torch.float64))
        noise, check_noise = row_noise(rows.index, C, self.seed)
        answered = torch.ones(R, dtype=torch.bool)
        if self.threshold is not None:
            answered = counts.max(1).values + self.sigma1 * check_noise >= self.threshold
        noisy = (counts + self.sigma * noise).argmax(1)
        label = torch.where(answered, noisy, torch.full_like(noisy, -1))
        probs = torch.full((R, C), 1.0 / C, dtype=rows.target.dtype)
        probs[answered] = torch.nn.functional.one_hot(noisy[answered], C).to(rows.target.dtype)
        self.queries += R
        self.answered += int(answered.sum())
        self.changed += int((noisy != counts.argmax(1))[answered].sum())
        return Labels(label, answered, probs)

    def summary(self) -> dict:
        slope = gaussian_rdp_slope(self.answered, self.queries, self.sigma, self.sigma1)
        epsilon, order = rdp_to_epsilon(slope, self.delta)
        return {
            "epsilon": epsilon,
            "delta": self.delta,
            "rdp_order": order,
            "queries": self.queries,
            "answered": self.answered,
            "noise_changed_votes": self.changed,
        }
