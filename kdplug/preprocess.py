"""Input adaptation for model teachers: channels, resize, normalize.

Data arrives as float32 ``[B, C, H, W]`` in ``[0, 1]`` at the dataset's own size; each
teacher adapts it to what its model expects with one ``Preprocess`` module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdplug.errors import UsageError

STATS_ROWS = 2048  # rows used to measure the data's mean/std


def _size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 3:  # timm's input_size (C, H, W)
        size = size[1:]
    if len(size) != 2 or min(size) < 1:
        raise UsageError(f"size must be N, H;W or C;H;W with positive values, got {size}")
    return size


class Preprocess(torch.nn.Module):
    """Match the channel count, resize to ``size`` (bilinear), then ``(x - mean) / std``.

    Grayscale input is repeated to 3 channels for a 3-channel model; other channel
    mismatches are an error naming both counts. Tabular ``[B, D]`` input passes through.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        in_chans: int | None = None,
    ):
        super().__init__()
        self.size = _size(size)
        self.in_chans = in_chans
        mean = [0.0] if mean is None else ([mean] if isinstance(mean, int | float) else mean)
        std = [1.0] if std is None else ([std] if isinstance(std, int | float) else std)
        if any(s <= 0 for s in std):
            raise UsageError(f"std must be positive, got {list(std)}")
        for name, values in (("mean", mean), ("std", std)):
            if in_chans is not None and len(values) not in (1, in_chans):
                raise UsageError(
                    f"{name} has {len(values)} values but in_chans is {in_chans}; give one per "
                    "channel or one for all"
                )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return x
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            else:
                raise UsageError(
                    f"the model expects {self.in_chans} channels, the data has {x.shape[1]}"
                )
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(
                x, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        return (x - self.mean) / self.std


def data_normalization(source: Any) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``STATS_ROWS`` evenly spaced rows of ``source``
    (a ``kdplug.data.DataSource`` of images): what ``distill`` normalizes a student's inputs
    with when nothing else gives them, and what a teacher with no recorded normalization
    is fed."""
    rows = np.linspace(0, len(source) - 1, min(len(source), STATS_ROWS)).round().astype(int)
    x, _, _ = source.batch(sorted(set(rows.tolist())))
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.tolist(), std.tolist()
