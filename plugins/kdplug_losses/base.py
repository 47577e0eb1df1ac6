"""What every distillation loss shares: its weights, temperature and the student's log-probs."""

from __future__ import annotations

import torch

from kdplug import ops
from kdplug_losses.checks import loss_weights, positive


class Distillation:
    """Base of the teacher-using losses. Subclasses implement ``__call__``.

    ``temperature`` is the T at which the engine builds the target; with ``standardize``
    the engine z-scores the teacher logits and the loss z-scores the student's.
    """

    uses_teachers = True

    def __init__(
        self,
        name: str,
        temperature: float,
        standardize: bool,
        ce_weight: float,
        kd_weight: float,
        temperature_option: str = "T",
    ):
        self.name = name
        self.temperature = positive(name, temperature_option, temperature)
        self.standardize = bool(standardize)
        self.ce_weight, self.kd_weight = loss_weights(name, ce_weight, kd_weight)

    def student_log_probs(self, student_logits: torch.Tensor) -> torch.Tensor:
        """``log_softmax(z / T)`` of the student ``[B, C]``, z standardized when asked."""
        z = ops.standardize(student_logits) if self.standardize else student_logits.float()
        return torch.log_softmax(z / self.temperature, dim=-1)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "name")
        return f"{self.name}({options})"


def kl_rows(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(target || q)`` per row ``[B]`` from probabilities and log-probs; 0·log 0 = 0."""
    return (torch.special.xlogy(target, target) - target * log_q).sum(-1)
