"""Combiners that weigh each teacher per row by how sure (or how right) it is."""

from __future__ import annotations

import torch

from kdplug.api import entropy
from kdplug_combiners.base import Combiner


def complement_weights(scores: torch.Tensor) -> torch.Tensor:
    """``w_k = (1 - s_k / sum_j s_j) / (K - 1)`` for scores ``[K, B]`` >= 0; a higher score
    weighs less. Rows whose scores are all 0 get equal weights; K = 1 gets weight 1."""
    K = scores.shape[0]
    if K == 1:
        return torch.ones_like(scores)
    total = scores.sum(0, keepdim=True)
    share = torch.where(total > 0, scores / total.clamp_min(1e-30), torch.full_like(scores, 1 / K))
    return (1 - share).clamp_min(0) / (K - 1)


def entropy_weights(log_probs: torch.Tensor) -> torch.Tensor:
    """EBKD weights ``[K, B]`` from each teacher's entropy (over the classes it knows)."""
    return complement_weights(entropy(log_probs.exp()))


class Entropy(Combiner):
    """EBKD (Kwon et al. 2020): ``w_k = (1 - H_k / sum_j H_j) / (K - 1)``."""

    name = "entropy"

    def weights(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return entropy_weights(log_probs)


class ConfidenceAware(Combiner):
    """CA-MKD (Zhang et al. 2022): ``L_k = -log p_k[y]``,
    ``w_k = (1 - softmax_k(L)_k) / (K - 1)``; rows with label -1 use the entropy weights.
    A teacher that does not know the label's class has a huge ``L_k`` and weighs ~0."""

    name = "ca-mkd"

    def weights(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        K, B, _ = log_probs.shape
        labeled = labels >= 0
        index = labels.long().clamp_min(0).view(1, B, 1).expand(K, B, 1)
        cross_entropy = -log_probs.gather(-1, index).squeeze(-1)
        if K == 1:
            by_label = torch.ones_like(cross_entropy)
        else:
            by_label = (1 - torch.softmax(cross_entropy, dim=0)) / (K - 1)
        return torch.where(labeled, by_label, entropy_weights(log_probs))


class Best(Combiner):
    """All weight on the teacher with the highest max-probability (the first on ties)."""

    name = "best"

    def weights(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        top = log_probs.max(-1).values.argmax(0)
        return torch.zeros_like(log_probs[..., 0]).scatter_(0, top.unsqueeze(0), 1.0)
