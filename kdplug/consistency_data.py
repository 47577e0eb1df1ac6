"""What a consistency loss (``LossStrategy.strong_augment``: FixMatch family) needs of the data.

- ``TwoViews``: each decoded image as its weak view (``--augment``'s transform, else the
  image at the data's size) and its strong view (timm's ``create_transform`` with the
  ``--augment`` options and the loss's ``strong_augment`` on top), stacked ``[2, C, H, W]``,
  so a batch is ``[B, 2, C, H, W]``; made in the loader's workers like any augmentation.
- ``WeakViews``: a teacher store's view rebuilding (``Producer.rebuild_views``) applied to
  the weak view alone, the one the teachers see.
- ``RatioOrder``: the rows of an epoch when the loss sets ``unlabeled_ratio`` μ: each batch
  holds ``batch_size / (1 + μ)`` labeled rows (cycled through reshuffles) and the rest
  unlabeled; an epoch is one pass over this rank's unlabeled rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdplug import distributed
from kdplug.augment import Augment
from kdplug.data import plain_image
from kdplug.errors import UsageError


class PlainView:
    """A decoded image as the data path makes it without augmentation
    (``kdplug.data.plain_image``): float32 ``[C, H, W]`` in [0, 1] at the data's size."""

    def __init__(self, input_shape: tuple[int, int, int]):
        self.shape = tuple(input_shape)

    def __call__(self, image: Any) -> np.ndarray:
        if isinstance(image, np.ndarray):  # an array image, or a deep (mode F) one
            if image.shape == self.shape:
                return np.asarray(image, dtype=np.float32)
            from PIL import Image

            image = Image.fromarray(np.asarray(image[0], dtype=np.float32))  # mode F
        return plain_image(image, self.shape)


class TwoViews:
    """One decoded image -> float32 ``[2, C, H, W]``: its weak view, then its strong one."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        weak: dict[str, Any] | None,
        strong: dict[str, Any],
    ):
        self.weak = Augment(input_shape, weak) if weak is not None else PlainView(input_shape)
        self.strong = Augment(input_shape, {**(weak or {}), **strong})

    def __call__(self, image: Any) -> np.ndarray:
        return np.stack([self.weak(image), self.strong(image)])


class WeakViews:
    """``rebuild_views(x, idx, epoch)`` on the weak views ``x[:, 0]`` of a two-view batch
    ``[B, 2, C, H, W]``; the strong views are left as made."""

    def __init__(self, rebuild: Any):
        self.rebuild = rebuild

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        out = x.clone()
        out[:, 0] = self.rebuild(x[:, 0], idx, epoch)
        return out


class RatioOrder:
    """``order(epoch)``: this rank's rows of ``epoch`` (an int64 array) in batches of
    ``labeled_per_batch`` labeled rows then ``batch_size - labeled_per_batch`` unlabeled
    ones (``labels [N]``: -1 marks an unlabeled row). ``rows`` is how many rows each rank
    gets per epoch."""

    def __init__(
        self, labels: np.ndarray, batch_size: int, ratio: float, seed: int, loss: str = "the loss"
    ):
        self.labeled = np.flatnonzero(labels >= 0)
        self.unlabeled = np.flatnonzero(labels < 0)
        if not len(self.unlabeled):
            raise UsageError(
                f"{loss} learns from unlabeled rows and this run has none: give --unlabeled "
                "DATA (or --train rows without a label)"
            )
        if batch_size < 2:
            raise UsageError("--batch-size must be at least 2 to hold labeled and unlabeled rows")
        self.labeled_per_batch = min(max(1, round(batch_size / (1 + ratio))), batch_size - 1)
        self.unlabeled_per_batch = batch_size - self.labeled_per_batch
        self.batch_size, self.seed = batch_size, seed
        share = distributed.rows_per_rank(len(self.unlabeled))
        self.steps = max(1, share // self.unlabeled_per_batch)
        self.rows = self.steps * batch_size

    def __call__(self, epoch: int) -> np.ndarray:
        world, rank = distributed.world_size(), distributed.rank()
        shared = np.random.default_rng([self.seed, epoch])  # the same on every rank
        unlabeled = self.unlabeled[shared.permutation(len(self.unlabeled))]
        share = np.resize(unlabeled, distributed.rows_per_rank(len(unlabeled)) * world)
        own = share[rank::world][: self.steps * self.unlabeled_per_batch]
        own = np.resize(own, self.steps * self.unlabeled_per_batch)  # a share shorter than a batch
        rng = np.random.default_rng([self.seed, epoch, rank, 1])
        needed = self.steps * self.labeled_per_batch
        cycles = -(-needed // len(self.labeled))  # distill refuses --train without labels
        stream = np.concatenate([rng.permutation(self.labeled) for _ in range(cycles)])
        batches = np.concatenate(
            [
                stream[:needed].reshape(self.steps, self.labeled_per_batch),
                own.reshape(self.steps, self.unlabeled_per_batch),
            ],
            axis=1,
        )
        return batches.reshape(-1)  # int64, not a list: ~40 B less a row in every worker
