"""The shared part of every combiner: per-row weights, then a per-class mixture."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kdplug.api import masked_log_softmax, normalize_weights, teacher_probs


def class_weights(weights: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Teacher weights ``[K, B]`` spread per class ``[K, B, C]`` and renormalized over the
    teachers that know each class (0 for a class no weighted teacher knows)."""
    per_class = weights.unsqueeze(-1) * known.unsqueeze(1).to(weights.dtype)
    total = per_class.sum(0, keepdim=True)
    return torch.where(total > 0, per_class / total.clamp_min(1e-30), torch.zeros_like(total))


def mixture(weights: torch.Tensor, probs: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Target ``[B, C]``: the per-class weighted mixture of ``probs`` ``[K, B, C]`` (0 where
    a teacher does not know the class), each row renormalized to sum to 1.

    ``sum_k class_weights * probs`` computed as ``sum_k w_k p_k / sum_k w_k known_k`` per
    class: one pass over ``probs``, the denominator a ``[B, K] x [K, C]`` product."""
    weights = weights.to(probs.dtype)
    summed = probs[0] * weights[0].unsqueeze(-1)
    for k in range(1, len(probs)):
        summed.addcmul_(probs[k], weights[k].unsqueeze(-1))
    total = weights.T @ known.to(probs.dtype)  # 0 only where every p_k is 0: then 0 / tiny
    summed.div_(total.clamp_min_(1e-30))
    return normalize_weights(summed, dim=-1, in_place=True)


class Combiner(ABC):
    """A combiner whose target is a mixture of probabilities. Subclasses define
    ``weights(log_probs [K, B, C] at temperature 1, labels [B]) -> [K, B]``."""

    name = "combiner"
    weights_read_log_probs = True  # False: weights() reads only its input's shape (given logits)

    @abstractmethod
    def weights(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-row teacher weights ``[K, B]`` (>= 0; normalized afterwards)."""

    def target(
        self,
        weights: torch.Tensor,
        logits: torch.Tensor,
        known: torch.Tensor,
        temperature: float,
        log_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mixture of each teacher's probabilities at ``temperature`` (``log_probs``: theirs
        at temperature 1, when already computed)."""
        if log_probs is not None and temperature == 1.0:
            return mixture(weights, log_probs.exp(), known)
        return mixture(weights, teacher_probs(logits, known, temperature), known)

    def __call__(
        self,
        logits: torch.Tensor,
        known: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[K, B, C]``, known ``[K, C]``, labels ``[B]`` -> weights ``[K, B]``,
        target ``[B, C]``."""
        log_probs = masked_log_softmax(logits, known) if self.weights_read_log_probs else None
        weights = self.weights(logits if log_probs is None else log_probs, labels)
        weights = normalize_weights(weights, dim=0)
        return weights, self.target(weights, logits, known, temperature, log_probs)

    def __repr__(self) -> str:
        return self.name
