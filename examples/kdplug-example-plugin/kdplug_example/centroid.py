"""The nearest-centroid teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import kdplug


class CentroidTeacher(torch.nn.Module):
    """``x [B, D] -> -scale * ||x - centroid_c||`` for each class c."""

    def __init__(self, centroids: np.ndarray, classes: list[str], scale: float):
        super().__init__()
        self.register_buffer("centroids", torch.as_tensor(centroids, dtype=torch.float32))
        self.classes = classes
        self.scale = scale

    @classmethod
    def load(cls, path: str, scale: float) -> CentroidTeacher:
        if not Path(path).is_file():
            raise kdplug.UsageError(f"centroid: no such file: {path}")
        with np.load(path, allow_pickle=False) as data:
            return cls(data["centroids"], [str(c) for c in data["classes"]], scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).to(self.centroids.dtype)
        return -self.scale * torch.cdist(x, self.centroids)
