"""The component protocols plugins implement (typing only: nothing here imports torch).

Shapes: ``K`` teachers, ``B`` rows in a batch, ``N`` rows in a dataset, ``C`` classes.
Labels are int64 with -1 for unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Teacher(Protocol):
    """``teacher(x) -> logits [B, C]``; x float32, images ``[B, C, H, W]`` in [0, 1] or rows
    ``[B, D]``. Optional attributes: ``classes`` (list of names), ``fingerprint`` (str)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Combiner(Protocol):
    """Turns K teachers' logits into per-sample weights ``[K, B]`` and a soft target.

    Optional ``fit(logits [K, N, C], known [K, C], labels [N]) -> dict``: the engines call
    it once with the teachers' outputs on the labeled rows (label -1 rows to be ignored)
    before combining any row, and record the JSON-ready dict it returns (kdplug.fitting).
    Optional ``predict(logits, known, labels) -> (weights, probs)``: the combined
    prediction, where it is not the target at temperature 1 (``auto``: calibrated
    teachers); ``kdplug.fitting.combined_prediction`` uses it.
    """

    def __call__(
        self,
        logits: torch.Tensor,
        known: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class LossStrategy(Protocol):
    """Distillation loss on a batch. Attributes: ``temperature`` (float, used to build the
    target), ``standardize`` (bool: z-score logits first), ``uses_teachers`` (False for a
    labels-only loss). Optional ``set_epoch(epoch, epochs)`` for warm-ups, and
    ``fit(logits, known, labels, combiner) -> dict`` called once on the labeled rows after
    the combiner's ``fit`` (e.g. to choose ``T=auto``)."""

    temperature: float
    standardize: bool
    uses_teachers: bool

    def __call__(
        self, student_logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class Labels:
    """A label generator's decision for N rows."""

    label: torch.Tensor  # [N] int64, -1 where rejected
    accepted: torch.Tensor  # [N] bool
    probs: torch.Tensor  # [N, C] soft label written with each row
    info: dict[str, Any] = field(default_factory=dict)  # parameters/estimates for the report


class LabelGenerator(Protocol):
    """Decides the pseudo-label of every row from the combined target and each teacher."""

    def __call__(
        self, target: torch.Tensor, teacher_probs: torch.Tensor, known: torch.Tensor
    ) -> Labels: ...
