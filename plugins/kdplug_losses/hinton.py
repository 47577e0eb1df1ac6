"""``kd``: Hinton et al. 2015, optionally on standardized logits (Sun et al. 2024)."""

from __future__ import annotations

import torch

from kdplug_losses.base import Distillation, kl_rows


class KD(Distillation):
    """``T^2 * KL(target || softmax(s / T))``, averaged over the batch's rows."""

    def __init__(self, T: float | str, standardize: bool, ce_weight: float, kd_weight: float):
        super().__init__("kd", T, standardize, ce_weight, kd_weight)

    def __call__(
        self, student_logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Student logits ``[B, C]``, target probabilities ``[B, C]`` at T -> scalar."""
        log_q = self.student_log_probs(student_logits)
        return self.temperature**2 * kl_rows(target.float(), log_q).mean()
