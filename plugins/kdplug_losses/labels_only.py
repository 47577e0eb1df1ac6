"""``ce``: train on the labels alone (the engine adds ``ce_weight * CE``)."""

from __future__ import annotations

import torch

from kdplug_losses.checks import positive


class LabelsOnly:
    """No distillation term: returns 0, and tells the engine not to run teachers."""

    uses_teachers = False
    temperature = 1.0
    standardize = False
    kd_weight = 0.0

    def __init__(self, ce_weight: float):
        self.ce_weight = positive("ce", "ce_weight", ce_weight)

    def __call__(
        self, student_logits: torch.Tensor, target: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """A zero scalar on the student's device."""
        return student_logits.new_zeros((), dtype=torch.float32)

    def __repr__(self) -> str:
        return f"ce(ce_weight={self.ce_weight})"
