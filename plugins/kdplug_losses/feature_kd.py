"""``fitnet`` and ``reviewkd``: feature distillation, as mdistiller implements it.

FitNets (Romero et al., ICLR 2015) regresses one teacher stage from the student's through a
convolutional regressor (mdistiller's ``ConvReg``); ReviewKD (Chen et al., CVPR 2021) fuses
the student's stages from the deepest up (attention-based fusion, ``ABF``) and compares
each with the teacher's stage by a pyramid of pooled MSEs (``hcl_loss``). Both add their
term to a base loss (``OnBase``); the projector modules are trained with the student and
kept in the run's checkpoint. Stages are timm's ``forward_intermediates`` indices, the
same for student and teacher. Reference: github.com/megvii-research/mdistiller,
mdistiller/distillers/FitNet.py, ReviewKD.py and _common.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdplug.api import UsageError
from kdplug_losses.checks import integer_at_least, positive
from kdplug_losses.on_base import OnBase

Shape = Sequence[int]  # one stage's feature shape (C, H, W)


def teacher_name(loss: str, teacher: str | None) -> str | None:
    """The ``teacher=`` option: a teacher's name, or None (the first with features)."""
    if teacher is not None and (not isinstance(teacher, str) or not teacher):
        raise UsageError(f"{loss}: teacher must name a teacher, got {teacher!r}")
    return teacher


def stage_shapes(loss: str, shapes: Sequence[Shape], count: int, whose: str) -> list[tuple]:
    """``count`` feature shapes ``(C, H, W)`` as int tuples."""
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    if len(shapes) != count or any(len(shape) != 3 for shape in shapes):
        raise ValueError(f"{loss}: expected {count} {whose} shapes (C, H, W), got {shapes}")
    return shapes


class ConvReg(nn.Module):
    """mdistiller's ``ConvReg`` (``use_relu=True``): student features ``[B, s_C, s_H, s_W]``
    to the teacher's ``[B, t_C, t_H, t_W]``, the conv chosen by the heights as there."""

    def __init__(self, s_shape: Shape, t_shape: Shape, where: str):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
            out_w = (s_w - 1) // 2 + 1
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
            out_w = 2 * s_w
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
            out_w = t_w
        else:
            out_w = None
        if out_w != t_w:
            raise UsageError(
                f"{where}: the student's features {tuple(s_shape)} (C, H, W) cannot be mapped "
                f"to the teacher's {tuple(t_shape)} (mdistiller's ConvReg takes a student twice, "
                "half or at least the teacher's size); choose another stage"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class FitNet(OnBase):
    """``weight * mse(ConvReg(f_s), f_t)`` at one stage, added to the base loss's term."""

    def __init__(
        self, base: str, stage: int, weight: float, teacher: str | None, base_options: dict
    ):
        super().__init__("fitnet", base, base_options, teachers=True)
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise UsageError(
                f"fitnet: stage must be an integer (a timm stage index), got {stage!r}"
            )
        self.stage = stage
        self.weight = positive("fitnet", "weight", weight)
        self.feature_stages = [stage]
        self.feature_teacher = teacher_name("fitnet", teacher)

    def build_projector(
        self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]
    ) -> nn.Module:
        """mdistiller's ConvReg between the stage's student and teacher features."""
        (s_shape,) = stage_shapes("fitnet", student_shapes, 1, "student")
        (t_shape,) = stage_shapes("fitnet", teacher_shapes, 1, "teacher")
        return ConvReg(s_shape, t_shape, f"fitnet: stage {self.stage}")

    def feature_loss(
        self, projector: nn.Module, student_features: list, teacher_features: list
    ) -> torch.Tensor:
        """``weight * F.mse_loss(projector(f_s), f_t)`` (mdistiller's FitNet.forward_train)."""
        (f_s,), (f_t,) = student_features, teacher_features
        return self.weight * F.mse_loss(projector(f_s).float(), f_t.float())

    def options(self) -> dict[str, Any]:
        return {"stage": self.stage, "weight": self.weight, "teacher": self.feature_teacher}


class ABF(nn.Module):
    """mdistiller's attention-based fusion: the student's stage (1x1 conv to ``mid``),
    fused with the deeper stage's result ``y`` by two sigmoid attention maps, resized to the
    teacher's size and mapped to its channels (3x3 conv)."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
            if fuse
            else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None, out_shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output at out_shape, the fused features for the next shallower stage)``."""
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (h, w), mode="nearest")  # mdistiller's `shape`: x's own size
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_shape):
            x = F.interpolate(x, out_shape, mode="nearest")
        return self.conv2(x), x


class ReviewProjector(nn.Module):
    """ReviewKD's ABFs, deepest first (``abfs[0]`` the pooled stage's, which fuses nothing):
    the student's stages (shallowest first, the pooled one last) to one output per stage at
    the teacher's sizes, in the same order."""

    def __init__(
        self, student_shapes: list[tuple], teacher_shapes: list[tuple], max_mid_channel: int
    ):
        super().__init__()
        mid = min(max_mid_channel, student_shapes[-1][0])
        last = len(student_shapes) - 1
        abfs = [
            ABF(s[0], mid, t[0], fuse=index < last)
            for index, (s, t) in enumerate(zip(student_shapes, teacher_shapes))
        ]
        self.abfs = nn.ModuleList(abfs[::-1])
        self.out_shapes = [(t[1], t[2]) for t in teacher_shapes[::-1]]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        x = features[::-1]
        out, res = self.abfs[0](x[0], None, self.out_shapes[0])
        results = [out]
        for stage, abf, out_shape in zip(x[1:], self.abfs[1:], self.out_shapes[1:]):
            out, res = abf(stage, res, out_shape)
            results.insert(0, out)
        return results


def with_pooled(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The stages and, as a last 1x1 stage, the last one average-pooled (mdistiller's
    ``pooled_feat``)."""
    return [*features, F.adaptive_avg_pool2d(features[-1], 1)]


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """mdistiller's ``hcl_loss``: per stage the MSE plus the MSEs of 4x4, 2x2 and 1x1
    average pools smaller than the stage, weighted 1/2, 1/4, 1/8, over the weights' sum."""
    total = 0.0
    for f_s, f_t in zip(student, teacher):
        f_s, f_t = f_s.float(), f_t.float()
        loss, weight, weights = F.mse_loss(f_s, f_t), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= f_s.shape[2]:
                continue
            weight /= 2.0
            pooled_s = F.adaptive_avg_pool2d(f_s, (size, size))
            pooled_t = F.adaptive_avg_pool2d(f_t, (size, size))
            loss = loss + F.mse_loss(pooled_s, pooled_t) * weight
            weights += weight
        total = total + loss / weights
    return total


class ReviewKD(OnBase):
    """``weight * warm-up * hcl_loss(ABF-fused student stages, teacher stages)`` on the
    last ``stages`` stages and their pooled feature, added to the base loss's term.

    The warm-up factor is mdistiller's ``min(epoch / warmup, 1)`` with its epochs counted
    from 1: here ``min((epoch + 1) / warmup, 1)`` for ``set_epoch``'s 0-based ``epoch``
    (``warmup=0``: none).
    """

    def __init__(
        self,
        base: str,
        stages: int,
        weight: float,
        warmup: int,
        max_mid_channel: int,
        teacher: str | None,
        base_options: dict,
    ):
        super().__init__("reviewkd", base, base_options, teachers=True)
        self.stages = integer_at_least("reviewkd", "stages", stages, 1)
        self.weight = positive("reviewkd", "weight", weight)
        self.warmup = integer_at_least("reviewkd", "warmup", warmup, 0)
        self.max_mid_channel = integer_at_least("reviewkd", "max_mid_channel", max_mid_channel, 1)
        self.feature_stages = list(range(-self.stages, 0))
        self.feature_teacher = teacher_name("reviewkd", teacher)
        self.own_epoch(0, 1)

    def own_epoch(self, epoch: int, epochs: int) -> None:
        """The warm-up factor for ``epoch`` (0-based), mdistiller's epoch ``epoch + 1``."""
        self.factor = 1.0 if self.warmup == 0 else min((epoch + 1) / self.warmup, 1.0)

    def build_projector(
        self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]
    ) -> nn.Module:
        """The ABFs: one per stage and one for the pooled feature, student channels in,
        teacher channels and sizes out."""
        student = stage_shapes("reviewkd", student_shapes, self.stages, "student")
        teacher = stage_shapes("reviewkd", teacher_shapes, self.stages, "teacher")
        student.append((student[-1][0], 1, 1))
        teacher.append((teacher[-1][0], 1, 1))
        return ReviewProjector(student, teacher, self.max_mid_channel)

    def feature_loss(
        self, projector: nn.Module, student_features: list, teacher_features: list
    ) -> torch.Tensor:
        """mdistiller's ReviewKD.forward_train's term, the warm-up factor of this epoch."""
        results = projector(with_pooled(list(student_features)))
        teacher = with_pooled(list(teacher_features))
        return self.weight * self.factor * hcl_loss(results, teacher)

    def options(self) -> dict[str, Any]:
        return {
            "stages": self.stages,
            "weight": self.weight,
            "warmup": self.warmup,
            "max_mid_channel": self.max_mid_channel,
            "teacher": self.feature_teacher,
        }
