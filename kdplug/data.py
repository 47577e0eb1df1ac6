"""The data path: a DATA spec -> a DataSource -> batches ``(x, y, idx)`` of tensors.

This is the only place that decodes images. ``x`` is float32, images ``[B, C, H, W]``
in ``[0, 1]`` and tabular rows ``[B, D]``; ``y`` is int64 with -1 where a row has no
label; ``idx`` is int64, the row's position in the dataset (what precomputed-logit
teachers and the label/cache engines key on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from kdplug.data_paths import data_spec
from kdplug.errors import KdplugError, UsageError
from kdplug.plugins import get_manager
from kdplug.spec import Spec

log = logging.getLogger("kdplug")

IMAGE_NAMES = ("image", "img", "pixel_values")
LABEL_NAMES = ("label", "labels")
# options every DATA spec accepts; the data path takes them, the source never sees them
DATA_OPTIONS = (
    "image_column",
    "label_column",
    "image_size",
    "image_mode",
    "max_pixels",
    "id_column",
)
IMAGE_MODES = {"L": 1, "RGB": 3}
COLOR_MODES = ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")
# one-channel modes of more than 8 bits: scaled by their bit depth, not clipped to 255
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
GRAY_MODES = ("L", "1", *DEEP_MODES)


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
    max_pixels: int | None = None  # PIL's decompression-bomb limit (max_pixels), None: PIL's
    id_column: str | None = None  # a column naming each row (id_column=NAME), not a feature
    root: str | None = None  # the folder the spec's REF names (absolute): files are under it

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def fingerprint(self) -> str:
        return str(getattr(self.dataset, "_fingerprint", "") or "")

    @property
    def split(self) -> dict[str, Any] | None:
        """The split read and every split its source holds (``{"read": "train", "splits":
        ["train", "test"]}``), as the dataset records them; None where it names no split."""
        read = self.dataset.split
        if read is None:
            return None
        splits = self.dataset.info.splits or {}
        return {"read": str(read), "splits": [str(s) for s in splits] or [str(read)]}

    @property
    def columns(self) -> list[str]:
        """The dataset's column names (error messages name them)."""
        return list(self.dataset.features)

    @property
    def in_chans(self) -> int:
        return self.input_shape[0] if self.kind == "image" else 1

    def batch(
        self, indices: list[int], augment: Callable | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode rows ``indices`` into ``(x, y, idx)``; ``augment`` (images only, a
        ``kdplug.augment.Augment``) transforms each decoded image instead of the resize."""
        if self.kind == "image":
            column = self.input_columns[0]
            with image_limits(self.max_pixels), naming(self.spec):
                rows = read_rows(self.dataset, list(indices), column)
                images = [
                    decode_image(v, self.input_shape, i, self.resize, self.mode_given, augment)
                    for v, i in zip(rows[column], indices)
                ]
            x = stack(images)
        else:
            rows = self.dataset[list(indices)]
            cols = [np.asarray(rows[c], dtype=np.float32) for c in self.input_columns]
            x = torch.from_numpy(np.stack(cols, axis=1))
        y = torch.tensor(self._labels(rows), dtype=torch.int64)
        return x, y, torch.tensor(indices, dtype=torch.int64)

    def labels(self) -> np.ndarray:
        """All labels as int64, -1 where unknown."""
        if self.label_column is None:
            return np.full(len(self), -1, dtype=np.int64)
        import pyarrow.compute as pc

        column = self.dataset.with_format("arrow")[self.label_column]
        if self.label_values is None:  # class ids (a ClassLabel): read as one Arrow column
            values = pc.fill_null(column, -1).to_numpy().astype(np.int64)
            return np.where(values < 0, -1, values)
        lookup = {v: i for i, v in enumerate(self.label_values)}  # the last of repeats
        found = value_positions(column, lookup)
        if found is None:  # values Arrow cannot match: one by one
            return np.asarray(self._labels({self.label_column: column.to_pylist()}))
        return found

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
        """Map this source's labels onto the run's class names (missing names become -1);
        data without labels just takes the run's class names."""
        if self.classes == classes:
            return self
        if self.label_column is None:
            return dataclasses.replace(self, classes=list(classes))
        if self.classes is None:
            raise UsageError(f"{self.spec}: its labels have no class names to match {classes}")
        own = self.label_values if self.label_values is not None else list(range(len(self.classes)))
        position = dict(zip(self.classes, own))
        values = [position.get(name, object()) for name in classes]
        return dataclasses.replace(self, classes=list(classes), label_values=values)


def stack(images: list[np.ndarray]) -> torch.Tensor:
    """Float32 ``[C, H, W]`` arrays as one ``[B, C, H, W]`` tensor; in a loader worker it is
    made in shared memory (as torch's ``default_collate`` makes it), so the batch reaches the
    main process without another copy."""
    return torch.utils.data.default_collate([torch.from_numpy(image) for image in images])


def decode_image(
    value: Any,
    shape: tuple[int, int, int],
    row: int,
    resize: bool = False,
    mode_given: bool = False,
    augment: Callable | None = None,
) -> np.ndarray:
    """One image (PIL, encoded dict, array or nested list) -> float32 ``[C, H, W]`` in [0, 1].

    Images are converted to the data's mode: grayscale, RGBA or palette to RGB is safe; a
    color image in grayscale data is refused unless the spec chose ``image_mode``. A size
    that differs from the data's is resized when ``resize`` (``image_size``), else refused.
    Grayscale images of more than 8 bits are scaled by their bit depth (see
    ``deep_intensities``); an image that cannot be decoded names its row and file.
    ``augment`` (``kdplug.augment.Augment``) makes the image's random view of the data's
    size from the decoded image (a random crop of the whole image, not of its resized copy).
    """
    from PIL import Image

    if value is None:
        raise UsageError(f"row {row}: no image")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = open_image(value, row)
    if isinstance(value, Image.Image):
        return _decode_pil(value, shape, row, resize, mode_given, augment)
    array = _decode_array(value, shape, row)
    return augment(array) if augment is not None else array


def _decode_pil(
    image: Any,
    shape: tuple[int, int, int],
    row: int,
    resize: bool,
    mode_given: bool,
    augment: Callable | None = None,
) -> np.ndarray:
    from PIL import Image

    channels, height, width = shape
    where = _where(row, getattr(image, "filename", None))
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UsageError(f"{where}: cannot decode an image into {channels} channels")
    if mode == "L" and image.mode in COLOR_MODES and not mode_given:
        raise UsageError(
            f"{where}: a {image.mode} image in data whose first image is grayscale; add "
            "image_mode=RGB to the data spec to read every image in color (or image_mode=L "
            "to make every image grayscale)"
        )
    if image.mode in DEEP_MODES:
        image = Image.fromarray(deep_intensities(image, where))  # mode F, in [0, 1]
    elif image.mode != mode:
        image = image.convert(mode)
    if image.size != (width, height) and not resize:
        raise UsageError(
            f"{where}: image is {image.size[0]}x{image.size[1]}, the data's images are "
            f"{width}x{height}; add image_size={height} to the data spec to resize all"
        )
    if augment is not None:  # its random crop is resized to the data's size
        return augment(image if image.mode != "F" else np.array(image)[None])
    return plain_image(image, shape)


def plain_image(image: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """A PIL image already in the data's mode (L, RGB, or F for deep grayscale) as float32
    ``[C, H, W]`` in [0, 1] at the data's size (bilinear where it differs): the data path's
    image without augmentation."""
    from PIL import Image

    channels, height, width = shape
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32)
    if image.mode != "F":  # a new array: divided in place
        array = np.divide(array, 255.0, out=array)
    if array.ndim == 2:
        return np.repeat(array[None], channels, axis=0)
    return array.transpose(2, 0, 1)  # a view: ``stack`` copies it once into the batch


def deep_intensities(image: Any, where: str) -> np.ndarray:
    """A grayscale image of more than 8 bits as float32 intensities in [0, 1].

    16-bit modes (``I;16*``) are divided by 65535. Mode ``I`` (32-bit signed) is divided by
    ``2**bits - 1`` with ``bits`` the file's depth where it says (16 for a PNG, TIFF's
    BitsPerSample), else by ``2**31 - 1``. Mode ``F`` (32-bit float) is taken as
    intensities already in [0, 1]. Values outside the range are refused, not clipped.
    """
    array = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(array).all():
            raise UsageError(f"{where}: a 32-bit float image (mode F) holds NaN or infinity")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise UsageError(
                f"{where}: a 32-bit float image (mode F) with values in "
                f"[{array.min():g}, {array.max():g}]; float images must hold intensities in "
                "[0, 1]"
            )
        return array.astype(np.float32)
    bits = _bit_depth(image)
    top = 2 ** min(bits, 31) - 1
    if array.size and (array.min() < 0 or array.max() > top):
        raise UsageError(
            f"{where}: a {bits}-bit image (mode {image.mode}) with values in "
            f"[{array.min()}, {array.max()}], outside 0..{top}"
        )
    return (array.astype(np.float64) / top).astype(np.float32)


def _bit_depth(image: Any) -> int:
    """Bits per sample of a one-channel integer image (``I;16*`` or ``I``)."""
    if image.mode.startswith("I;16") or image.format == "PNG":  # PNG holds at most 16 bits
        return 16
    bits = getattr(image, "tag_v2", {}).get(258)  # TIFF's BitsPerSample
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return bits if isinstance(bits, int) and 8 <= bits <= 32 else 32


def _decode_array(value: Any, shape: tuple[int, int, int], row: int) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"row {row}: not an image or a numeric array: {_one_line(exc)}") from exc
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)
    if array.shape != shape:
        raise UsageError(f"row {row}: array image of shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise UsageError(f"row {row}: the array image holds NaN or infinity")
    low, high = array.min(initial=0.0), array.max(initial=0.0)
    if low < 0 or high > 255:
        raise UsageError(
            f"row {row}: array image values lie in [{low:g}, {high:g}]; arrays must hold "
            "intensities in [0, 1] or [0, 255]"
        )
    if high > 1.0:
        array = array / 255.0
    return np.ascontiguousarray(array)


@contextlib.contextmanager
def image_limits(max_pixels: int | None) -> Iterator[None]:
    """Decode images under PIL's decompression-bomb limit (``max_pixels`` when given, else
    ``Image.MAX_IMAGE_PIXELS``), refusing PIL's warning zone (over the limit but under twice
    it, where PIL only warns) as it refuses what is over twice the limit."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@contextlib.contextmanager
def naming(name: str) -> Iterator[None]:
    """Prefix the data's name to a UsageError raised inside (a bad row or image)."""
    try:
        yield
    except UsageError as exc:
        if str(exc).startswith(f"{name}: "):
            raise
        raise UsageError(f"{name}: {exc}") from exc


def read_rows(dataset: Any, indices: list[int], column: str) -> dict[str, list]:
    """Rows ``indices`` of ``dataset``; an image in ``column`` that the dataset cannot decode
    is a UsageError naming its row and file."""
    try:
        return dataset[indices]
    except Exception:  # a damaged file fails inside datasets' decoder, as any type
        raw = _undecoded(dataset, column)
        for row in indices:
            value = raw[row][column]
            if isinstance(value, dict):
                open_image(value, row)
        raise


def _undecoded(dataset: Any, column: str) -> Any:
    """``dataset`` with the images of ``column`` as ``{"bytes", "path"}``, not decoded."""
    from datasets import Image

    feature = dataset.features.get(column)
    if isinstance(feature, Image) and feature.decode:
        return dataset.cast_column(column, Image(decode=False))
    return dataset


def open_image(value: dict, row: int) -> Any:
    """An encoded image (``{"bytes", "path"}``) decoded by PIL; a UsageError naming the row,
    the file and what is wrong when it cannot be."""
    from PIL import Image

    data, path = value.get("bytes"), value.get("path")
    where = _where(row, path)
    if data is None and not path:
        raise UsageError(f"row {row}: no image")
    if data is not None and len(data) == 0 or data is None and _is_empty_file(path):
        raise UsageError(f"{where}: the image file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data) if data else path)
        image.load()
    except Exception as exc:  # PIL raises many types for a damaged or hostile file
        raise UsageError(f"{where}: {_image_problem(exc, data, path)}") from exc
    return image


def _image_problem(exc: Exception, data: bytes | None, path: str | None) -> str:
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return (
            f"the image has {_pixels(data, path)} pixels, over PIL's decompression-bomb limit "
            f"of {Image.MAX_IMAGE_PIXELS} (Image.MAX_IMAGE_PIXELS); if you trust the file, "
            "add max_pixels=N to the data spec"
        )
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can read (corrupt, or not an image file)"
    return f"a corrupt or truncated image ({type(exc).__name__}: {_one_line(exc)})"


def _pixels(data: bytes | None, path: str | None) -> str:
    """``WxH = N`` of an image over the size limit, read from its header alone."""
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data) if data else path) as image:
            width, height = image.size
        return f"{width}x{height} = {width * height}"
    except Exception:  # only for the message: the file was refused already
        return "too many"
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _is_empty_file(path: str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.path.getsize(path) == 0


def _where(row: int, path: str | None) -> str:
    return f"row {row} ({path})" if path else f"row {row}"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def load_data(spec: str | Spec, classes: list[str] | None = None) -> DataSource:
    """Build the dataset named by ``spec`` (a bare path too: ``kdplug.data_paths``) and
    detect its columns and classes."""
    dataset, name, data_options, spec = open_dataset(spec)
    source = describe(dataset, name, **data_options)
    source.root = _folder(spec.ref)
    return source.with_classes(classes) if classes is not None else source


def open_dataset(spec: str | Spec) -> tuple[Any, str, dict[str, Any], Spec]:
    """The (non-empty) dataset ``spec`` names, its name for messages, the data options
    written on it (``DATA_OPTIONS``) and the spec as resolved."""
    spec = data_spec(spec)
    written = spec.raw if spec.raw is not None else spec.options  # as written: label_column=01
    data_options = {k: written[k] for k in DATA_OPTIONS if k in written}
    dataset = get_manager().create("datasets", spec.without(*DATA_OPTIONS))
    name = str(spec) if str(spec).isprintable() else repr(str(spec))  # messages: one line
    if len(dataset) == 0:
        raise UsageError(f"{name}: the dataset is empty")
    return dataset, name, data_options, spec


def _folder(ref: str | None) -> str | None:
    """The absolute path of the folder ``ref`` names, or None (no ref, not a folder)."""
    if not ref or not os.path.isdir(os.path.expanduser(ref)):
        return None
    return os.path.abspath(os.path.expanduser(ref))


def pick_column(
    features: Any, wanted: Any, typed: type, names: tuple[str, ...], role: str, where: str
) -> str | None:
    """The ``role`` column of ``features``: ``wanted`` (refused unless it is one), else the
    first of type ``typed``, else the first of ``names``; None if none."""
    columns = list(features)
    if wanted is not None:
        if not isinstance(wanted, str) or wanted not in features:
            raise UsageError(f"{where}: no {role} column {wanted!r} (columns: {columns})")
        return wanted
    typed_cols = [c for c in columns if isinstance(features[c], typed)]
    return typed_cols[0] if typed_cols else next((c for c in names if c in features), None)


def describe(
    dataset: Any,
    name: str,
    image_column: str | None = None,
    label_column: str | None = None,
    image_size: Any = None,
    image_mode: str | None = None,
    max_pixels: Any = None,
    id_column: str | None = None,
) -> DataSource:
    """Detect the image (or feature) columns, the label column and the class names;
    ``id_column`` names each row (it is never a feature)."""
    from datasets import ClassLabel, Image, Value

    features = dataset.features
    columns = list(features)
    label = pick_column(features, label_column, ClassLabel, LABEL_NAMES, "label", name)
    image = pick_column(features, image_column, Image, IMAGE_NAMES, "image", name)
    if id_column is not None:
        if not isinstance(id_column, str) or id_column not in features:
            raise UsageError(f"{name}: no id column {id_column!r} (columns: {columns})")
        if id_column in (label, image):
            raise UsageError(f"{name}: id_column {id_column!r} is its label or image column")
    classes, values = None, None
    if label is not None:
        feature = features[label]
        if isinstance(feature, ClassLabel):
            classes = list(feature.names)
        else:
            values = distinct_labels(unique_values(dataset, label), name, label)
            classes = [str(v) for v in values]
    if image is not None:
        if max_pixels is not None:
            max_pixels = _positive_int(max_pixels)
            if max_pixels is None:
                raise UsageError(f"{name}: max_pixels must be a positive integer")
        shape = _image_shape(dataset, image, name, image_size, max_pixels)
        if image_mode is not None:
            if not isinstance(image_mode, str) or image_mode not in IMAGE_MODES:
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
            max_pixels=max_pixels,
            id_column=id_column,
        )
    numeric = [
        c
        for c in columns
        if c not in (label, id_column)
        and isinstance(features[c], Value)
        and features[c].dtype.startswith(("int", "uint", "float", "bool"))
    ]
    if not numeric:
        raise UsageError(
            f"{name}: no image column ({', '.join(IMAGE_NAMES)} or an Image feature) and no "
            f"numeric feature columns; columns are {columns} (use image_column=NAME)"
        )
    shape = (len(numeric),)
    return DataSource(
        name, dataset, "tabular", numeric, label, classes, shape, values, id_column=id_column
    )


def value_positions(column: Any, lookup: dict[Any, int]) -> np.ndarray | None:
    """Each value of an Arrow ``column``'s position in ``lookup`` (-1: none, also for
    null), by one Arrow ``index_in``, no Python per row; keys that are not strings or
    numbers are left out. None where Arrow cannot match the column's values to the keys."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = [(v, i) for v, i in lookup.items() if isinstance(v, (str, int, float))]
    try:
        found = pc.index_in(column, value_set=pa.array([v for v, _ in wanted]))
    except (pa.ArrowException, TypeError):
        return None
    position = np.append(np.array([i for _, i in wanted], dtype=np.int64), -1)
    return position[pc.fill_null(found, -1).to_numpy()]


def unique_values(dataset: Any, column: str) -> list[Any]:
    """A column's distinct values, found by Arrow (the whole column where Arrow cannot, as
    for lists, which ``distinct_labels`` then refuses)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.unique(dataset.with_format("arrow")[column]).to_pylist()
    except (pa.ArrowException, TypeError):
        return dataset[column]


def distinct_labels(values: list[Any], name: str, column: str) -> list[Any]:
    """The classes of a label column without class names: its distinct values, sorted.

    None, NaN and -1 mean "no label"; whole floats (a CSV column with an empty cell) count
    as ints. Integer labels that are not 0..C-1 are said once in the log.
    """
    present = set()
    try:
        for v in values:
            if v is None or v == -1 or (isinstance(v, float) and math.isnan(v)):
                continue
            present.add(int(v) if isinstance(v, float) and v.is_integer() else v)
        ordered = sorted(present)
    except TypeError as exc:  # lists, dicts or mixed types: not class labels
        raise UsageError(
            f"{name}: label column {column!r} holds values that are not class labels "
            f"({_one_line(exc)}); use label_column=NAME"
        ) from exc
    dense = list(range(len(ordered)))
    if ordered == dense:
        return dense  # bools too: classes "0" and "1"
    if not all(isinstance(v, int) for v in ordered):
        return ordered
    shown = [str(v) for v in ordered[:10]] + (["..."] if len(ordered) > 10 else [])
    log.info(
        "%s: the integer labels are not 0..C-1; the classes are their %d distinct values "
        "%s (a row's class is its label's position in this list)",
        name,
        len(ordered),
        ", ".join(shown),
    )
    return ordered


def _positive_int(value: Any) -> int | None:
    """An option value as a positive int (also from its text, ``"8"``), else None."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _image_shape(
    dataset: Any, column: str, name: str, image_size: Any, max_pixels: int | None = None
) -> tuple[int, int, int]:
    with image_limits(max_pixels), naming(name):
        first = read_rows(dataset, [0], column)[column][0]
        if isinstance(first, dict) and ("bytes" in first or "path" in first):
            first = open_image(first, 0)
    if first is None:
        raise UsageError(f"{name}: row 0 has no image in column {column!r}")
    if hasattr(first, "mode"):
        channels = 1 if first.mode in GRAY_MODES else 3
        width, height = first.size
    else:
        shape = np.asarray(first).shape
        if len(shape) == 3 and shape[-1] in (1, 3) and shape[0] not in (1, 3):
            shape = (shape[2], shape[0], shape[1])
        channels, height, width = shape if len(shape) == 3 else (1, *shape)
    if image_size is not None:
        size = image_size if isinstance(image_size, list) else [image_size, image_size]
        size = [_positive_int(s) for s in size]
        if len(size) != 2 or None in size:
            raise UsageError(f"{name}: image_size must be N or H;W, got {image_size!r}")
        height, width = size
    return channels, height, width


class Chunk(NamedTuple):
    """A batch's rows, the seed of its random augmentation and its epoch (``EpochBatches``)."""

    rows: list[int]
    seed: int
    epoch: int = 0


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded with ``seed`` inside and restored
    after, so a batch's augmentation depends on its seed alone, in whichever process it runs
    (a loader worker, or the main process with ``workers=0``); nothing is done for None."""
    if seed is None:
        yield
        return
    import random

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches, so rows are fetched in bulk; with
    ``augment``, a ``Chunk``'s images are augmented here, in the loader's worker, and with
    ``views`` the decoded batch becomes ``views(x, idx, epoch)`` here too (a teacher
    store's view of each row: ``Producer.rebuild_views``)."""

    def __init__(
        self, source: DataSource, augment: Callable | None = None, views: Callable | None = None
    ):
        self.source, self.augment, self.views = source, augment, views

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: list[int] | Chunk):
        rows, seed, epoch = item if isinstance(item, Chunk) else (item, None, 0)
        try:
            if self.augment is None:
                batch = self.source.batch(rows)
            else:
                with seeded(seed):
                    batch = self.source.batch(rows, augment=self.augment)
            if self.views is None:
                return batch
            x, y, idx = batch
            return self.views(x, idx, epoch), y, idx
        except KdplugError as exc:
            if torch.utils.data.get_worker_info() is None:
                raise
            return exc  # from a worker: _Loader raises it whole, not torch's re-wrapped copy


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader that raises a worker's kdplug error as it was (one line, its type)."""

    def __iter__(self):
        for item in super().__iter__():
            if isinstance(item, KdplugError):
                raise item
            yield item


class EpochBatches:
    """The batches of one epoch at a time, the epoch set with ``set_epoch``: a persistent
    loader's sampler. ``order(epoch)`` gives the epoch's ``rows`` rows, cut into batches
    (``drop_last``); each batch is a ``Chunk`` whose seed comes from ``(seed, epoch, rank,
    batch)``, so it is augmented alike in any worker, with any number of them, and on resume."""

    def __init__(
        self,
        order: Callable[[int], list[int]],
        rows: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
    ):
        self.order, self.batch_size, self.seed, self.rank = order, batch_size, seed, rank
        self.count = batch_count(rows, batch_size, drop_last=True)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Chunk]:
        chunks = batches_of(self.order(self.epoch), self.batch_size, drop_last=True)
        sequence = np.random.SeedSequence([self.seed, self.epoch, self.rank])
        seeds = sequence.generate_state(len(chunks), dtype=np.uint64).tolist()
        return map(Chunk, chunks, seeds, [self.epoch] * len(chunks))


class EpochLoader(_Loader):
    """A loader over ``EpochBatches`` whose workers (and their open files) persist from one
    epoch to the next: ``set_epoch(epoch)``, then iterate."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def epoch_loader(
    source: DataSource,
    sampler: EpochBatches,
    *,
    augment: Callable | None = None,
    views: Callable | None = None,
    workers: int | None = None,
    pin_memory: bool = False,
) -> EpochLoader:
    """The loader of a training run, built once: ``sampler``'s batches of ``source``, decoded
    and augmented (``augment``, then ``views``: see ``_Batches``) in ``workers`` processes
    that persist across epochs, pinned when ``pin_memory``. Its own generator seeds the
    workers, so iterating it leaves torch's global stream (dropout, mixup) as it was, on the
    first epoch as on the next ones."""
    workers = default_workers(len(source)) if workers is None else workers
    return EpochLoader(
        _Batches(source, augment, views),
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def default_workers(rows: int) -> int:
    """Loader workers: none for small data, else up to 4 (or KDPLUG_WORKERS)."""
    if "KDPLUG_WORKERS" in os.environ:
        return int(os.environ["KDPLUG_WORKERS"])
    return 0 if rows < 20_000 else min(4, os.cpu_count() or 1)


def batches_of(rows: Sequence[int], batch_size: int, drop_last: bool) -> list[Sequence[int]]:
    """``rows`` (a list, or an int64 array: each batch is then a view of it) cut into
    batches of ``batch_size`` (``batch_count`` of them)."""
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return chunks[: batch_count(len(rows), batch_size, drop_last)]


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
    indices: Sequence[int] | None = None,
    seed: int = 0,
    epoch: int = 0,
    workers: int | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    groups: list[list[int]] | None = None,
    persistent: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``source`` (or the rows ``indices``) yielding ``(x, y, idx)``.

    ``groups`` (instead of ``indices``): row lists batched one after another, no batch
    crossing from one group into the next (label's shards: one loader, one set of workers,
    for all of them). ``persistent``: its workers live on to serve it again (a loader
    iterated once per epoch)."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if groups is not None:
        chunks = [c for rows in groups for c in batches_of(rows, batch_size, drop_last)]
        rows = [row for rows in groups for row in rows]
    else:
        rows = np.arange(len(source)) if indices is None else indices
        if shuffle:
            rows = shuffled(rows, seed, epoch)
        chunks = batches_of(rows, batch_size, drop_last)
    workers = default_workers(len(rows)) if workers is None else workers
    return _Loader(
        _Batches(source),
        sampler=chunks,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
    )


def shuffled(rows: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """``rows`` in the random order of ``epoch`` (the same for the same seed and epoch), an
    int64 array: 8 bytes a row, where a list of Python ints takes about 40 (and a loader's
    workers, forked while the order is held, count those pages again)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return np.asarray(rows, dtype=np.int64)[torch.randperm(len(rows), generator=generator).numpy()]


def index_batches(
    source: DataSource, ranges: Sequence[range], batch_size: int, device: Any
) -> Iterator[tuple[torch.Tensor, None, torch.Tensor]]:
    """``(x, None, idx)`` batches of each range of rows in turn, cut as ``batches(groups=...)``
    cuts them, for teachers that never read ``x`` (``uses_inputs = False``): ``x`` is a zero
    tensor of the inputs' shape that takes no memory (one element, broadcast)."""
    zero = torch.zeros((), device=device)
    for rows in ranges:
        for start in range(rows.start, rows.stop, batch_size):
            idx = torch.arange(start, min(start + batch_size, rows.stop))
            yield zero.expand(len(idx), *source.input_shape), None, idx
