"""``mean`` and ``mean-logits``: every teacher weighs the same."""

from __future__ import annotations

import torch

from kdplug.api import masked_log_softmax
from kdplug_combiners.base import Combiner, class_weights


class Mean(Combiner):
    """Target = average of the teachers' probabilities."""

    name = "mean"
    weights_read_log_probs = False  # equal weights: only the shape

    def weights(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        K, B, _ = log_probs.shape
        return log_probs.new_full((K, B), 1.0 / K)


class MeanLogits(Mean):
    """Target = softmax of the average log-probabilities at ``temperature`` (a geometric
    mean of the teachers' distributions). Per class the average covers the teachers that
    know the class; with full class sets it equals the softmax of the mean logits, since
    log-probabilities differ from logits by a per-row constant."""

    name = "mean-logits"

    def target(
        self,
        weights: torch.Tensor,
        logits: torch.Tensor,
        known: torch.Tensor,
        temperature: float,
        log_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        per_class = class_weights(weights, known)
        log_probs = masked_log_softmax(logits, known) if log_probs is None else log_probs
        mean = (per_class * log_probs).sum(0)
        # -inf, not IMPOSSIBLE: a mean log-probability can itself be far below IMPOSSIBLE
        mean = mean.masked_fill(per_class.sum(0) == 0, float("-inf"))
        return torch.softmax(mean / temperature, dim=-1)
