"""Augmented views that can be rebuilt exactly: parameters drawn at cache time, pixels at use.

A view of an image ``[C, H, W]`` is described by its parameters alone:

- ``box`` ``(x0, y0, x1, y1)``: the crop, in coordinates normalized to ``[0, 1]``;
- ``flip``: mirrored left to right;
- ``seed``: a 64-bit number from which every other random choice (brightness, contrast)
  is derived; ``seed == 0`` marks the plain view (the input itself, untouched).

``rebuild_views`` turns an input batch and its views' parameters into the views' pixels
with torch operations that act on each row alone (elementwise arithmetic and
``grid_sample``), so a view comes out bit for bit the same whichever batch it is rebuilt
in, at cache time and at training time. Crops are RandomResizedCrop-style: the crop is
resized (bilinear) back to the full ``H x W``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdplug.errors import UsageError
from kdplug.spec import parse_spec

DEFAULT = "default"


@dataclass(frozen=True)
class ViewAugment:
    """The random augmentation of the stored views.

    ``scale`` (area fraction) and ``ratio`` (width / height) bound the crop box as in
    RandomResizedCrop; ``hflip`` is the flip probability; ``brightness`` and ``contrast``
    ``b`` multiply pixels (brightness) or their distance to mid-gray (contrast) by a factor
    drawn from ``[1 - b, 1 + b]``.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViewAugment:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def parse_view_augment(text: str | None) -> ViewAugment:
    """``--augment`` text (``scale=0.35;1,hflip=0,brightness=0.2``) -> a ViewAugment.

    None, empty or ``default`` give the defaults (those of RandomResizedCrop, flip 0.5).
    """
    if text is None or str(text).strip().lower() in ("", DEFAULT):
        return ViewAugment()
    options = parse_spec(f"augment,{text}").options
    fields = ViewAugment.__dataclass_fields__
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise UsageError(
            f"--augment: unknown option(s) {', '.join(unknown)} (known: {', '.join(fields)})"
        )
    values: dict[str, Any] = {}
    for key in ("scale", "ratio"):
        if key in options:
            pair = options[key]
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
            ):
                raise UsageError(f"--augment: {key} must be two numbers like 0.5;1, got {pair!r}")
            values[key] = (float(pair[0]), float(pair[1]))
    for key in ("hflip", "brightness", "contrast"):
        if key in options:
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UsageError(f"--augment: {key} must be a number, got {value!r}")
            values[key] = float(value)
    augment = ViewAugment(**values)
    low, high = augment.scale
    if not 0 < low <= high <= 1:
        raise UsageError(f"--augment: scale must satisfy 0 < low <= high <= 1, got {low};{high}")
    low, high = augment.ratio
    if not 0 < low <= high:
        raise UsageError(f"--augment: ratio must satisfy 0 < low <= high, got {low};{high}")
    if not 0 <= augment.hflip <= 1:
        raise UsageError(f"--augment: hflip must be in [0, 1], got {augment.hflip}")
    for key in ("brightness", "contrast"):
        if not 0 <= getattr(augment, key) < 1:
            raise UsageError(f"--augment: {key} must be in [0, 1), got {getattr(augment, key)}")
    return augment


@dataclass
class ViewParams:
    """Parameters of ``V`` views of ``R`` rows: ``boxes [R, V, 4]`` float32 (x0, y0, x1, y1),
    ``flips [R, V]`` bool, ``seeds [R, V]`` int64 (0 only for view 0, the plain input)."""

    boxes: np.ndarray
    flips: np.ndarray
    seeds: np.ndarray


def sample_views(
    augment: ViewAugment,
    rows: int,
    views: int,
    height: int,
    width: int,
    rng: np.random.Generator,
) -> ViewParams:
    """Draw the parameters of ``views`` views per row: view 0 plain, the others random.

    The crop has a uniform area fraction in ``scale`` and a log-uniform aspect ratio in
    ``ratio`` (in pixels), is shrunk to fit the image where it would not, and is placed
    uniformly inside it.
    """
    boxes = np.zeros((rows, views, 4), dtype=np.float32)
    boxes[..., 2:] = 1.0
    flips = np.zeros((rows, views), dtype=bool)
    seeds = np.zeros((rows, views), dtype=np.int64)
    n = (rows, views - 1)
    if views > 1:
        area = rng.uniform(augment.scale[0], augment.scale[1], n)
        aspect = np.exp(rng.uniform(math.log(augment.ratio[0]), math.log(augment.ratio[1]), n))
        w = np.minimum(np.sqrt(area * aspect * height / width), 1.0)
        h = np.minimum(np.sqrt(area / aspect * width / height), 1.0)
        x0 = rng.uniform(0.0, 1.0, n) * (1.0 - w)
        y0 = rng.uniform(0.0, 1.0, n) * (1.0 - h)
        boxes[:, 1:] = np.stack([x0, y0, x0 + w, y0 + h], axis=-1)
        flips[:, 1:] = rng.uniform(0.0, 1.0, n) < augment.hflip
        seeds[:, 1:] = rng.integers(1, 2**62, n, dtype=np.int64)
    return ViewParams(boxes, flips, seeds)


def seeded_uniform(seeds: np.ndarray, stream: int) -> np.ndarray:
    """One number in ``[0, 1)`` per seed and ``stream`` (splitmix64 of the seed)."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(stream + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def rebuild_views(
    x: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    seeds: torch.Tensor,
    augment: ViewAugment | None,
) -> torch.Tensor:
    """The views of the rows of ``x`` ``[B, C, H, W]`` (float32, in [0, 1]) described by
    ``boxes [B, 4]``, ``flips [B]`` and ``seeds [B]``; rows with seed 0 are returned as is.

    Deterministic: a row's view depends on that row's pixels and parameters only.
    """
    out = x.clone()
    seeds_np = np.asarray(seeds.cpu(), dtype=np.int64)
    rows = torch.from_numpy(np.flatnonzero(seeds_np != 0)).to(x.device)
    if not len(rows) or augment is None:
        return out
    images = x[rows].float()
    box = boxes.to(x.device, torch.float32)[rows]
    flip = flips.to(x.device, torch.bool)[rows]
    B, _, H, W = images.shape
    u = (torch.arange(W, device=x.device, dtype=torch.float32) * 2 + 1) / W - 1  # [W]
    v = (torch.arange(H, device=x.device, dtype=torch.float32) * 2 + 1) / H - 1  # [H]
    u = torch.where(flip[:, None], -u, u)  # [B, W]
    x0, y0, x1, y1 = box.unbind(1)
    gx = (2 * x0 - 1)[:, None] + (u + 1) * (x1 - x0)[:, None]  # [B, W]
    gy = (2 * y0 - 1)[:, None] + (v + 1) * (y1 - y0)[:, None]  # [B, H]
    grid = torch.stack([gx[:, None, :].expand(B, H, W), gy[:, :, None].expand(B, H, W)], -1)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    picked = seeds_np[seeds_np != 0]
    if augment.brightness > 0:
        factor = 1 + augment.brightness * (2 * seeded_uniform(picked, 0) - 1)
        views = views * torch.from_numpy(factor).to(views)[:, None, None, None]
    if augment.contrast > 0:
        factor = 1 + augment.contrast * (2 * seeded_uniform(picked, 1) - 1)
        views = (views - 0.5) * torch.from_numpy(factor).to(views)[:, None, None, None] + 0.5
    out[rows] = views.clamp(0, 1).to(out.dtype)
    return out
