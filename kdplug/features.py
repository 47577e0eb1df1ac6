"""Intermediate features for feature losses (``LossStrategy.feature_stages``: FitNets, ReviewKD).

The student gives its features through timm's ``forward_intermediates`` inside one module
(``StudentFeatures``), so that under DistributedDataParallel the whole forward goes
through the wrapper; the teacher's come from the producer (``request_features``). Before
training, one probe batch gives every stage's shape, from which the loss builds its
projector (``build_projector``): trained with the student, kept in the run's checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from kdplug.errors import UsageError, component_name, running


def model_intermediates(
    model: torch.nn.Module, x: torch.Tensor, stages: list[int], owner: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(logits, features)`` of a model with timm's feature interface, from one pass:
    ``forward_head`` of ``forward_intermediates``' final map, and the features ``[B, C_i,
    H_i, W_i]`` at ``stages``. A stage the model lacks is a UsageError naming ``owner``."""
    try:
        final, features = model.forward_intermediates(
            x, indices=list(stages), intermediates_only=False
        )
    except AssertionError as exc:  # timm's check of the indices against its stages
        if "out of range" not in str(exc):
            raise
        raise UsageError(
            f"{owner} has no feature stages {list(stages)} (timm: {exc}; stages are "
            "forward_intermediates indices, negative from the last)"
        ) from None
    return model.forward_head(final), list(features)


class StudentFeatures(torch.nn.Module):
    """The student with the loss's projector: ``forward(x)`` gives ``(logits [B, C],
    features)`` (one pass: ``forward_head`` of ``forward_intermediates``' final map);
    ``forward(x, teacher_features, rows)`` gives ``(logits, the loss's feature term)`` on the
    features of ``x``'s rows ``rows``, so that under DistributedDataParallel the projector
    runs inside the wrapped forward. ``projector`` is set once its shapes are known."""

    def __init__(self, model: torch.nn.Module, loss: Any):
        super().__init__()
        self.model, self.loss = model, loss
        self.stages = list(loss.feature_stages)
        self.projector: torch.nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        teacher_features: list[torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        logits, features = model_intermediates(self.model, x, self.stages, "the student")
        if teacher_features is None:
            return logits, features
        features = [f[rows].float() for f in features]
        with running(self.loss, "the loss"):
            term = self.loss.feature_loss(self.projector, features, teacher_features)
        return logits, term

    def no_weight_decay(self) -> set[str]:
        """The student's own exemptions (timm's ``no_weight_decay``), under its name here."""
        own = getattr(self.model, "no_weight_decay", None)
        return {f"model.{name}" for name in own()} if callable(own) else set()


def check_feature_run(loss: Any, model: torch.nn.Module, producer: Any, spec: str) -> str:
    """Refuse a feature loss whose student or producer offers no features; ask the producer
    for the teacher's and return that teacher's name (logged by the caller)."""
    name = component_name(loss, "the loss")
    if not (
        callable(getattr(model, "forward_intermediates", None))
        and callable(getattr(model, "forward_head", None))
    ):
        raise UsageError(
            f"{name} compares intermediate features; the student {spec} offers none (a timm "
            "student does, through forward_intermediates)"
        )
    request = getattr(producer, "request_features", None)
    if not callable(request):
        raise UsageError(
            f"{name} compares intermediate features, which a store does not hold (its "
            "outputs are logits only): give the live teachers with --teacher SPEC"
        )
    return request(loss.feature_teacher, list(loss.feature_stages))


def stage_shapes(features: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """Each stage's ``(C, H, W)`` (a batch's features less the batch dimension)."""
    return [tuple(f.shape[1:]) for f in features]


def add_projector(
    wrapped: StudentFeatures,
    producer: Any,
    batch: tuple[torch.Tensor, torch.Tensor],
    normalize: Any,
) -> None:
    """Run the student and the teachers once on ``batch`` ``(x, idx)`` (a few train rows on
    the run's device, in [0, 1]) and give ``wrapped`` the loss's projector, built from both
    sides' stage shapes; a count of stages that differs is refused."""
    x, idx = batch
    loss = wrapped.loss
    with torch.no_grad():
        training = wrapped.training
        wrapped.eval()
        _, student_features = wrapped(normalize(x))
        wrapped.train(training)
        teacher_features = producer(x, idx).features
    name = component_name(loss, "the loss")
    if teacher_features is None or len(teacher_features) != len(student_features):
        count = 0 if teacher_features is None else len(teacher_features)
        raise UsageError(
            f"{name}: the student gives {len(student_features)} feature stages and the "
            f"teacher {count}"
        )
    with running(loss, "the loss", " building its projector"):
        projector = loss.build_projector(
            stage_shapes(student_features), stage_shapes(teacher_features)
        )
    if not isinstance(projector, torch.nn.Module):
        raise UsageError(f"{name}: build_projector returned {type(projector).__name__}")
    wrapped.projector = projector.to(x.device)
