"""``weighted``: fixed teacher weights given by the user."""

from __future__ import annotations

import math

import torch

from kdplug.api import UsageError
from kdplug_combiners.base import Combiner


def _fixed_weights(weights: object) -> list[float]:
    """The option as a list of finite numbers >= 0, not all 0, normalized to sum to 1."""
    if weights is None:
        raise UsageError("weighted: option weights is required, e.g. weighted:weights=0.7;0.3")
    values = weights if isinstance(weights, list) else [weights]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"weighted: weights must be numbers, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"weighted: weights must be >= 0, got {value}")
    total = sum(values)
    if total <= 0:
        raise UsageError("weighted: weights must not all be 0")
    return [float(v) / total for v in values]


class Weighted(Combiner):
    """The same given weights on every row; one weight per teacher, in --teacher order."""

    name = "weighted"

    def __init__(self, weights: object):
        self.fixed = _fixed_weights(weights)

    def weights(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        K, B, _ = log_probs.shape
        if len(self.fixed) != K:
            raise UsageError(f"weighted: got {len(self.fixed)} weights for {K} teachers")
        fixed = torch.tensor(self.fixed, dtype=log_probs.dtype, device=log_probs.device)
        return fixed.unsqueeze(1).expand(K, B)

    def __repr__(self) -> str:
        return f"weighted(weights={self.fixed})"
