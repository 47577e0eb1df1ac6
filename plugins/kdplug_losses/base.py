"""What every distillation loss shares: its weights, temperature and the student's log-probs."""

from __future__ import annotations

from typing import Any

import torch

from kdplug.api import UsageError
from kdplug.api import standardize as z_score
from kdplug_losses.checks import loss_weights, temperature_or_auto


class Distillation:
    """Base of the teacher-using losses. Subclasses implement ``__call__``.

    ``temperature`` is the T at which the engine builds the target; with ``standardize``
    the engine z-scores the teacher logits and the loss z-scores the student's. Given as
    ``auto``, T is chosen by ``fit`` on the labeled rows before training
    (``kdplug.api.choose_temperature``).
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
        self.temperature_option = temperature_option
        self.chosen_temperature = temperature_or_auto(name, temperature_option, temperature)
        self.auto_temperature = self.chosen_temperature is None
        if self.auto_temperature:  # only then is there something to fit on labeled rows
            self.fit = self.pick_temperature
        self.standardize = bool(standardize)
        self.ce_weight, self.kd_weight = loss_weights(name, ce_weight, kd_weight)

    @property
    def temperature(self) -> float:
        if self.chosen_temperature is None:
            raise UsageError(
                f"{self.name}: {self.temperature_option}=auto is chosen on labeled rows before "
                "training, and this run has none; give a number instead"
            )
        return self.chosen_temperature

    def pick_temperature(
        self, logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor, combiner: Any
    ) -> dict[str, Any]:
        """``fit`` of a loss with ``T=auto``: the candidate T whose tempered combined target
        has the lowest held-out NLL on the labeled rows (``kdplug.api.choose_temperature``).
        ``logits [K, N, C]``, ``labels [N]``. Returns the choice and every candidate's NLL."""
        from kdplug.api import choose_temperature

        if not (labels >= 0).any():
            return {self.temperature_option: None, "rows": 0}
        choice = choose_temperature(combiner, logits, known, labels)
        self.chosen_temperature = choice["T"]
        return {self.temperature_option: choice.pop("T"), **choice}

    def student_log_probs(self, student_logits: torch.Tensor) -> torch.Tensor:
        """``log_softmax(z / T)`` of the student ``[B, C]``, z standardized when asked."""
        z = student_logits.float()
        if self.standardize:  # every student logit counts, however low (no IMPOSSIBLE mask)
            z = z_score(z, skip_impossible=False)
        return torch.log_softmax(z / self.temperature, dim=-1)

    def __repr__(self) -> str:
        hidden = ("name", "temperature_option", "chosen_temperature", "auto_temperature", "fit")
        options = {k: v for k, v in vars(self).items() if k not in hidden}
        options = {self.temperature_option: self.describe_temperature(), **options}
        options = ", ".join(f"{k}={v}" for k, v in options.items())
        return f"{self.name}({options})"

    def describe_temperature(self) -> str:
        """The temperature for reprs: the number, ``auto`` or ``auto->T`` once chosen."""
        if not self.auto_temperature:
            return f"{self.chosen_temperature}"
        return "auto" if self.chosen_temperature is None else f"auto->{self.chosen_temperature}"


def kl_rows(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(target || q)`` per row ``[B]`` from probabilities and log-probs; 0·log 0 = 0."""
    return (torch.special.xlogy(target, target) - target * log_q).sum(-1)
