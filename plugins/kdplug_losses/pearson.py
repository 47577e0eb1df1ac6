"""``dist``: Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

import torch

from kdplug_losses.base import Distillation
from kdplug_losses.checks import non_negative


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of matching rows of ``a`` and ``b`` ``[N, M]`` -> ``[N]``.

    A constant row has correlation 0 (the ``eps`` in the denominator), as in DIST's code.
    """
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


class DIST(Distillation):
    """``tau^2 * (beta * inter + gamma * intra)`` with ``inter = 1 - mean_b rho(rows)``,
    ``intra = 1 - mean_c rho(columns)`` of the ``[B, C]`` probabilities at ``tau``."""

    def __init__(self, beta: float, gamma: float, tau: float, ce_weight: float, kd_weight: float):
        super().__init__("dist", tau, False, ce_weight, kd_weight, temperature_option="tau")
        self.beta = non_negative("dist", "beta", beta)
        self.gamma = non_negative("dist", "gamma", gamma)

    def __call__(
        self, student_logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Student logits ``[B, C]``, target probabilities ``[B, C]`` at tau -> scalar."""
        probs = self.student_log_probs(student_logits).exp()
        target = target.float()
        inter = 1 - pearson(probs, target).mean()
        intra = 1 - pearson(probs.T, target.T).mean()
        return self.temperature**2 * (self.beta * inter + self.gamma * intra)
