"""An example kdplug plugin: one teacher source and one dataset source.

- teacher ``centroid:PATH``: a nearest-centroid classifier stored as a ``.npz`` file with
  arrays ``centroids`` ``[C, D]`` and ``classes`` ``[C]``; logits are ``-scale * distance``.
- dataset ``blobs:N``: N rows of Gaussian blobs (tabular), options ``classes``,
  ``features``, ``seed``.

Heavy libraries are imported inside the factories, so ``kdplug --help`` stays fast.
"""

from __future__ import annotations

import kdplug

__version__ = "0.1.0"


def centroid(ref: str, scale: float = 1.0):
    """Nearest-centroid teacher from a .npz of class centroids (logits = -scale * distance)."""
    from kdplug_example.centroid import CentroidTeacher

    if scale <= 0:
        raise kdplug.UsageError(f"centroid: scale must be > 0, got {scale}")
    return CentroidTeacher.load(ref, scale)


def blobs(ref: str, classes: int = 3, features: int = 4, seed: int = 0):
    """Gaussian blobs (tabular): blobs:ROWS,classes=3,features=4,seed=0."""
    from kdplug_example.blobs import make_blobs_dataset

    try:
        rows = int(ref)
    except ValueError:
        raise kdplug.UsageError(f"blobs: the reference is a row count, got {ref!r}") from None
    if rows < 1 or classes < 2 or features < 1:
        raise kdplug.UsageError("blobs: need rows >= 1, classes >= 2 and features >= 1")
    return make_blobs_dataset(rows, classes, features, seed)


@kdplug.hookimpl
def register_teachers(register):
    register("centroid", centroid)


@kdplug.hookimpl
def register_datasets(register):
    register("blobs", blobs)
