"""A loss that adds its own term to another loss, its ``base`` (``fixmatch,base=kd``).

The base is built from the losses registry with the options the outer spec does not take
(``fixmatch,base=kd,T=4,threshold=0.9``: ``T=4`` is kd's). Everything the engine reads of a
loss (temperature, standardize, weights, ``fit``, ``set_epoch``, the call) is the base's;
the subclass adds its term through the optional members of ``kdplug.api.LossStrategy``
(``consistency``, ``feature_loss``).
"""

from __future__ import annotations

from typing import Any

import torch

from kdplug.api import UsageError, create_component


class OnBase:
    """The base loss's members, delegated; ``uses_teachers`` may be forced on (a feature
    loss needs teachers whatever its base)."""

    def __init__(self, name: str, base: str, base_options: dict[str, Any], teachers: bool = False):
        self.name = name
        if base == name or not isinstance(base, str) or not base:
            raise UsageError(f"{name}: base must name another loss, got {base!r}")
        self.base = create_component("losses", base, **base_options)
        for member in ("consistency", "feature_loss"):
            if getattr(self.base, member, None) is not None:
                raise UsageError(f"{name}: base={base} adds a term of its own; give a plain loss")
        self.uses_teachers = bool(teachers or self.base.uses_teachers)
        self.fit = getattr(self.base, "fit", None)

    @property
    def temperature(self) -> float:
        return self.base.temperature

    @property
    def standardize(self) -> bool:
        return self.base.standardize

    @property
    def ce_weight(self) -> float:
        return self.base.ce_weight

    @property
    def kd_weight(self) -> float:
        return self.base.kd_weight if self.base.uses_teachers else 0.0

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The base's warm-up (if any), then the subclass's (``own_epoch``)."""
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch, epochs)
        self.own_epoch(epoch, epochs)

    def own_epoch(self, epoch: int, epochs: int) -> None:
        """The subclass's per-epoch state (a warm-up); nothing by default."""

    def __call__(
        self, student_logits: torch.Tensor, target: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """The base's term; 0 for a labels-only base."""
        if not self.base.uses_teachers:
            return student_logits.new_zeros((), dtype=torch.float32)
        return self.base(student_logits, target, labels)

    def options(self) -> dict[str, Any]:
        """The subclass's own options for ``repr`` (its constructor's values)."""
        return {}

    def __repr__(self) -> str:
        own = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}(base={self.base!r}{', ' + own if own else ''})"
