"""The data path: a DATA spec -> a DataSource -> batches ``(x, y, idx)`` of tensors.

This is the only place that decodes images. ``x`` is float32, images ``[B, C, H, W]``
in ``[0, 1]`` and tabular rows ``[B, D]``; ``y`` is int64 with -1 where a row has no
label; ``idx`` is int64, the row's position in the dataset (what precomputed-logit
teachers and the label/cache engines key on).
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdplug.errors import UsageError
from kdplug.plugins import get_manager
from kdplug.spec import Spec, parse_spec

IMAGE_NAMES = ("image", "img", "pixel_values")
LABEL_NAMES = ("label", "labels")
# options every DATA spec accepts; the data path takes them, the source never sees them
DATA_OPTIONS = ("image_column", "label_column", "image_size", "image_mode")
IMAGE_MODES = {"L": 1, "RGB": 3}
COLOR_MODES = ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")


@dataclass
class DataSource:
    """A dataset with its detected columns, class names and input shape."""

    spec: str
    dataset: Any  # datasets.Dataset
    kind: str  # "image" or "tabular"
    input_columns: list[str]
    label_column: str | None
    classes: list[str] | None
    input_shape: tuple[int, ...]  # (C, H, W) or (D,)
    label_values: list[Any] | None = None  # raw label values in class order, when not ClassLabel
    resize: bool = False  # resize images to input_shape (the spec asked for image_size)
    mode_given: bool = False  # the spec chose the channels (image_mode): convert every image

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def fingerprint(self) -> str:
        return str(getattr(self.dataset, "_fingerprint", "") or "")

    @property
    def columns(self) -> list[str]:
        """The dataset's column names (error messages name them)."""
        return list(self.dataset.features)

    @property
    def in_chans(self) -> int:
        return self.input_shape[0] if self.kind == "image" else 1

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode rows ``indices`` into ``(x, y, idx)``."""
        rows = self.dataset[list(indices)]
        if self.kind == "image":
            images = rows[self.input_columns[0]]
            x = torch.from_numpy(
                np.stack(
                    [
                        decode_image(v, self.input_shape, i, self.resize, self.mode_given)
                        for v, i in zip(images, indices)
                    ]
                )
            )
        else:
            cols = [np.asarray(rows[c], dtype=np.float32) for c in self.input_columns]
            x = torch.from_numpy(np.stack(cols, axis=1))
        y = torch.tensor(self._labels(rows), dtype=torch.int64)
        return x, y, torch.tensor(indices, dtype=torch.int64)

    def labels(self) -> np.ndarray:
        """All labels as int64, -1 where unknown."""
        if self.label_column is None:
            return np.full(len(self), -1, dtype=np.int64)
        return np.asarray(self._labels({self.label_column: self.dataset[self.label_column]}))

    def _labels(self, rows: dict[str, list]) -> list[int]:
        n = len(next(iter(rows.values())))
        if self.label_column is None:
            return [-1] * n
        values = rows[self.label_column]
        if self.label_values is None:
            return [-1 if v is None or v < 0 else int(v) for v in values]
        lookup = {v: i for i, v in enumerate(self.label_values)}
        return [lookup.get(v, -1) if v is not None else -1 for v in values]

    def with_classes(self, classes: list[str]) -> DataSource:
        """Map this source's labels onto the run's class names (missing names become -1)."""
        if self.classes == classes or self.label_column is None:
            return self
        if self.classes is None:
            raise UsageError(f"{self.spec}: its labels have no class names to match {classes}")
        own = self.label_values if self.label_values is not None else list(range(len(self.classes)))
        position = dict(zip(self.classes, own))
        values = [position.get(name, object()) for name in classes]
        return dataclasses.replace(self, classes=list(classes), label_values=values)


def decode_image(
    value: Any,
    shape: tuple[int, int, int],
    row: int,
    resize: bool = False,
    mode_given: bool = False,
) -> np.ndarray:
    """One image (PIL, encoded dict, array or nested list) -> float32 ``[C, H, W]`` in [0, 1].

    Images are converted to the data's mode: grayscale, RGBA or palette to RGB is safe; a
    color image in grayscale data is refused unless the spec chose ``image_mode``. A size
    that differs from the data's is resized when ``resize`` (``image_size``), else refused.
    """
    from PIL import Image

    channels, height, width = shape
    if value is None:
        raise UsageError(f"row {row}: no image")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if isinstance(value, Image.Image):
        mode = {1: "L", 3: "RGB"}.get(channels)
        if mode is None:
            raise UsageError(f"row {row}: cannot decode an image into {channels} channels")
        if mode == "L" and value.mode in COLOR_MODES and not mode_given:
            raise UsageError(
                f"row {row}: a {value.mode} image in data whose first image is grayscale; add "
                "image_mode=RGB to the data spec to read every image in color (or image_mode=L "
                "to make every image grayscale)"
            )
        image = value.convert(mode) if value.mode != mode else value
        if image.size != (width, height) and resize:
            image = image.resize((width, height), Image.BILINEAR)
        elif image.size != (width, height):
            raise UsageError(
                f"row {row}: image is {image.size[0]}x{image.size[1]}, the data's images are "
                f"{width}x{height}; add image_size={height} to the data spec to resize all"
            )
        array = np.asarray(image, dtype=np.float32) / 255.0
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()
    array = np.asarray(value, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)
    if array.shape != shape:
        raise UsageError(f"row {row}: array image of shape {array.shape}, expected {shape}")
    if array.max(initial=0.0) > 1.0:
        array = array / 255.0
    return np.ascontiguousarray(array)


def load_data(spec: str | Spec, classes: list[str] | None = None) -> DataSource:
    """Build the dataset named by ``spec`` and detect its columns and classes."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    data_options = {k: spec.options[k] for k in DATA_OPTIONS if k in spec.options}
    source_spec = Spec(
        spec.name,
        spec.ref,
        {k: v for k, v in spec.options.items() if k not in DATA_OPTIONS},
        spec.text,
    )
    dataset = get_manager().create("datasets", source_spec)
    if len(dataset) == 0:
        raise UsageError(f"{spec}: the dataset is empty")
    source = describe(dataset, str(spec), **data_options)
    return source.with_classes(classes) if classes is not None else source


def describe(
    dataset: Any,
    name: str,
    image_column: str | None = None,
    label_column: str | None = None,
    image_size: Any = None,
    image_mode: str | None = None,
) -> DataSource:
    """Detect the image (or feature) columns, the label column and the class names."""
    from datasets import ClassLabel, Image, Value

    features = dataset.features
    columns = list(features)

    def pick(wanted: str | None, typed: type, names: tuple[str, ...], role: str) -> str | None:
        if wanted is not None:
            if wanted not in features:
                raise UsageError(f"{name}: no {role} column {wanted!r} (columns: {columns})")
            return wanted
        typed_cols = [c for c in columns if isinstance(features[c], typed)]
        return typed_cols[0] if typed_cols else next((c for c in names if c in features), None)

    label = pick(label_column, ClassLabel, LABEL_NAMES, "label")
    image = pick(image_column, Image, IMAGE_NAMES, "image")
    classes, values = None, None
    if label is not None:
        feature = features[label]
        if isinstance(feature, ClassLabel):
            classes = list(feature.names)
        else:
            present = sorted({v for v in dataset[label] if v is not None and v != -1})
            values = present
            if all(isinstance(v, int) for v in present):
                values = list(range(max(present) + 1)) if present else []
            classes = [str(v) for v in values]
    if image is not None:
        shape = _image_shape(dataset, image, name, image_size)
        if image_mode is not None:
            if image_mode not in IMAGE_MODES:
                raise UsageError(f"{name}: image_mode must be L or RGB, got {image_mode!r}")
            shape = (IMAGE_MODES[image_mode], *shape[1:])
        return DataSource(
            name,
            dataset,
            "image",
            [image],
            label,
            classes,
            shape,
            values,
            resize=image_size is not None,
            mode_given=image_mode is not None,
        )
    numeric = [
        c
        for c in columns
        if c != label
        and isinstance(features[c], Value)
        and features[c].dtype.startswith(("int", "uint", "float", "bool"))
    ]
    if not numeric:
        raise UsageError(
            f"{name}: no image column ({', '.join(IMAGE_NAMES)} or an Image feature) and no "
            f"numeric feature columns; columns are {columns} (use image_column=NAME)"
        )
    return DataSource(name, dataset, "tabular", numeric, label, classes, (len(numeric),), values)


def _image_shape(dataset: Any, column: str, name: str, image_size: Any) -> tuple[int, int, int]:
    first = dataset[0][column]
    if first is None:
        raise UsageError(f"{name}: row 0 has no image in column {column!r}")
    if hasattr(first, "mode"):
        channels = 1 if first.mode in ("L", "1", "I", "F", "I;16") else 3
        width, height = first.size
    else:
        shape = np.asarray(first).shape
        if len(shape) == 3 and shape[-1] in (1, 3) and shape[0] not in (1, 3):
            shape = (shape[2], shape[0], shape[1])
        channels, height, width = shape if len(shape) == 3 else (1, *shape)
    if image_size is not None:
        size = image_size if isinstance(image_size, list) else [image_size, image_size]
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise UsageError(f"{name}: image_size must be N or H;W, got {image_size!r}")
        height, width = size
    return channels, height, width


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches, so rows are fetched in bulk."""

    def __init__(self, source: DataSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices: list[int]):
        return self.source.batch(indices)


def default_workers(rows: int) -> int:
    """Loader workers: none for small data, else up to 4 (or KDPLUG_WORKERS)."""
    if "KDPLUG_WORKERS" in os.environ:
        return int(os.environ["KDPLUG_WORKERS"])
    return 0 if rows < 20_000 else min(4, os.cpu_count() or 1)


def batch_count(rows: int, batch_size: int, drop_last: bool) -> int:
    """How many batches ``batches`` makes of ``rows`` rows: with ``drop_last`` a last
    partial batch is dropped, unless it is the only one."""
    full, partial = divmod(rows, batch_size)
    return full + (1 if partial and (not drop_last or full == 0) else 0)


def batches(
    source: DataSource,
    batch_size: int,
    *,
    shuffle: bool = False,
    indices: list[int] | None = None,
    seed: int = 0,
    epoch: int = 0,
    workers: int | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``source`` (or the rows ``indices``) yielding ``(x, y, idx)``."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    rows = list(range(len(source))) if indices is None else list(indices)
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    chunks = chunks[: batch_count(len(rows), batch_size, drop_last)]
    workers = default_workers(len(rows)) if workers is None else workers
    return torch.utils.data.DataLoader(
        _Batches(source),
        sampler=chunks,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
