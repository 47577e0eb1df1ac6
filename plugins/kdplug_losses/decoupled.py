"""``dkd``: decoupled knowledge distillation (Zhao et al., CVPR 2022)."""

from __future__ import annotations

import torch

from kdplug.api import UsageError
from kdplug_losses.base import Distillation, kl_rows
from kdplug_losses.checks import non_negative


class DKD(Distillation):
    """``T^2 * (alpha * TCKD + beta * NCKD)`` times the warm-up factor.

    The target class ``y`` is the row's label, or the target's argmax on unlabeled rows
    (label -1). TCKD compares the binary ``[p_y, 1 - p_y]``; NCKD the distributions over
    the other classes, renormalized. The warm-up factor is ``min((epoch + 1) / warmup, 1)``
    with ``epoch`` counted from 0 (``warmup=0``: no warm-up); it starts at epoch 0.
    """

    def __init__(
        self,
        alpha: float,
        beta: float,
        T: float | str,
        warmup: int,
        standardize: bool,
        ce_weight: float,
        kd_weight: float,
    ):
        super().__init__("dkd", T, standardize, ce_weight, kd_weight)
        self.alpha = non_negative("dkd", "alpha", alpha)
        self.beta = non_negative("dkd", "beta", beta)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise UsageError(f"dkd: warmup must be an integer >= 0 epochs, got {warmup}")
        self.warmup = warmup
        self.set_epoch(0, 1)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Set the warm-up factor for ``epoch`` (0-based) of ``epochs``."""
        self.factor = 1.0 if self.warmup == 0 else min((epoch + 1) / self.warmup, 1.0)

    def __call__(
        self, student_logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Student logits ``[B, C]``, target probabilities ``[B, C]`` at T, labels ``[B]``."""
        target = target.float()
        log_q = self.student_log_probs(student_logits)
        y = torch.where(labels >= 0, labels.long(), target.argmax(-1)).unsqueeze(-1)
        is_y = torch.zeros_like(target, dtype=torch.bool).scatter_(-1, y, True)

        # binary [target class, rest]; the rest is summed, not 1 - p_y, to keep its precision
        p_y = target.gather(-1, y).squeeze(-1)
        p_rest = target.masked_fill(is_y, 0).sum(-1)
        binary_t = torch.stack([p_y, p_rest], -1) / (p_y + p_rest).unsqueeze(-1)
        log_q_y = log_q.gather(-1, y).squeeze(-1)
        log_q_rest = log_q.masked_fill(is_y, float("-inf")).logsumexp(-1)
        tckd = kl_rows(binary_t, torch.stack([log_q_y, log_q_rest], -1))

        # the other classes, renormalized exactly however small their mass (a confident
        # teacher at T = 1 leaves ~1e-33); a target with no mass outside y gives NCKD = 0
        rest = p_rest.unsqueeze(-1)
        others = target.masked_fill(is_y, 0)
        others_t = torch.where(rest > 0, others / torch.where(rest > 0, rest, 1.0), 0.0)
        log_others_q = (log_q - log_q_rest.unsqueeze(-1)).masked_fill(is_y, 0)
        nckd = kl_rows(others_t, log_others_q)

        loss = self.alpha * tckd + self.beta * nckd
        return self.factor * self.temperature**2 * loss.mean()
