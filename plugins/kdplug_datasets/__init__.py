"""Data sources: disk, parquet, csv, imagefolder, hf (the hub) and sklearn's bundled sets.

Every factory returns a ``datasets.Dataset``; the core's data path detects its columns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import kdplug
from kdplug.api import UsageError, describe, path_source

__version__ = kdplug.__version__
log = logging.getLogger("kdplug")
_SAID: set[tuple[str, str, bool]] = set()  # (data, split, chosen by the user): said once


def _shown(ref: str) -> str:
    """A reference as messages print it: as written, or quoted when it holds a newline or
    another unprintable character (so that every message stays one line)."""
    return ref if ref.isprintable() else repr(ref)


def _existing(ref: str, what: str) -> Path:
    path = Path(ref).expanduser()
    if not path.exists():
        raise UsageError(f"{what}: no such file or directory: {_shown(ref)}")
    return path


def _one_split(data, split: str | None, ref: str):
    """A Dataset from a Dataset or DatasetDict, choosing ``split``."""
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data
    return data[_pick_split(list(data), split, ref)]


def _pick_split(splits: list[str], split: str | None, ref: str) -> str:
    """``split``, else "train", else the only split; a UsageError naming the splits."""
    if split is None:
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
    if split not in splits:
        wrong = "" if split is None else f"no split {split!r}; "
        raise UsageError(f"{_shown(ref)}: {wrong}choose a split with split=NAME (splits: {splits})")
    return split


def disk(ref: str, split: str | None = None):
    """A dataset saved with datasets' save_to_disk (a Dataset or a DatasetDict).

    Of a DatasetDict only the chosen split is read, so an empty other split is no matter.
    """
    import datasets

    path = _existing(ref, "disk")
    splits = _saved_splits(path)
    if splits is not None:
        given, split = split, _pick_split(splits, split, ref)
        path = path / split
    if _saved_empty(path):
        shown = f"disk:{ref},split={split}" if splits is not None else f"disk:{ref}"
        raise UsageError(f"{shown}: the dataset is empty")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a bad or empty directory
        instead = _instead(path, ref, "disk")
        raise UsageError(
            f"disk:{ref} is not a readable saved dataset ({describe(exc)}){instead}"
        ) from exc
    data = _one_split(data, split, ref)
    if splits is not None:
        _say_split(f"disk:{_shown(ref)}", split, splits, given, len(data))
    return data


def _say_split(name: str, split: str, splits: list[str], given: str | None, rows: int) -> None:
    """Say which split of several was read (once per process): a warning where kdplug
    chose it (train), a note where the spec did; nothing for data of one split."""
    others = [s for s in splits if s != split]
    key = (name, split, given is not None)
    if not others or key in _SAID:
        return
    _SAID.add(key)
    also = ", ".join(repr(s) for s in others)
    if given is None:
        log.warning(
            "%s: read the %r split (%d rows); it also holds %s: add split=NAME to the data "
            "spec to read another",
            name,
            split,
            rows,
            also,
        )
    else:
        log.info("%s: read the %r split (%d rows); it also holds %s", name, split, rows, also)


def _instead(path: Path, ref: str, source: str) -> str:
    """``; it is a folder of class subfolders: read it with imagefolder:PATH`` where another
    source reads ``path``, else ""."""
    other, holds = path_source(path)
    if other is None or other == source:
        return ""
    return f"; it is {holds}: read it with {other}:{_shown(ref)}"


def _saved_splits(path: Path) -> list[str] | None:
    """The split names of a saved DatasetDict, None for anything else."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(s) for s in splits] if isinstance(splits, list) else None


def _saved_empty(path: Path) -> bool:
    """Whether a saved Dataset holds no data files (save_to_disk of 0 rows, which
    load_from_disk cannot read back)."""
    try:
        return json.loads((path / "state.json").read_text())["_data_files"] == []
    except (OSError, ValueError, KeyError, TypeError):
        return False  # load_from_disk says what is wrong with it


def _files(builder: str, ref: str, **kwargs):
    import datasets

    path = _existing(ref, builder)
    files = sorted(str(p) for p in path.glob(f"*.{builder}")) if path.is_dir() else [str(path)]
    if not files:
        raise UsageError(f"{builder}: no .{builder} files in {ref}")
    if all(_empty(builder, f) for f in files):
        raise UsageError(f"{builder}:{ref}: the dataset is empty")
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for a bad file
        raise UsageError(f"{builder}:{ref} could not be read: {describe(exc)}") from exc


def _empty(builder: str, file: str) -> bool:
    """Whether a parquet/csv file holds no data rows (datasets refuses such files)."""
    if builder == "parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.ParquetFile(file).metadata.num_rows == 0
        except Exception:
            return False  # let datasets report what is wrong with it
    with open(file, encoding="utf-8", errors="replace") as fh:
        return sum(1 for line, _ in zip(fh, range(2)) if line.strip()) < 2


def parquet(ref: str):
    """Parquet file(s): a file or a directory of *.parquet (tabular or with an image column)."""
    return _files("parquet", ref)


def csv(ref: str):
    """CSV file(s): a file or a directory of *.csv; numeric columns are the features."""
    return _files("csv", ref)


def imagefolder(ref: str, split: str | None = None):
    """A folder of images with one subfolder per class (datasets' imagefolder builder).

    A folder of split folders (``train/``, ``test/``, ``validation/``, ...) is read one
    split at a time: ``split=NAME``, else ``train``; the log says which split was read and
    which others the folder holds.
    """
    import datasets

    path = _existing(ref, "imagefolder")
    name = f"imagefolder:{_shown(ref)}"
    try:
        builder = datasets.load_dataset_builder("imagefolder", data_dir=str(path))
        splits = [str(s) for s in builder.config.data_files]
        chosen = _pick_split(splits, split, name)
        data = datasets.load_dataset("imagefolder", data_dir=str(path), split=chosen)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"imagefolder:{ref} could not be read: {describe(exc)}") from exc
    _say_split(name, chosen, splits, split, len(data))
    return data


def hf(ref: str, split: str | None = None, config: str | None = None, revision: str | None = None):
    """A dataset from the Hugging Face hub or a local dataset directory (load_dataset):
    ``split=NAME``, else ``train`` (the log names the other splits it holds)."""
    import datasets

    try:
        data = datasets.load_dataset(ref, config, split=split or "train", revision=revision)
    except Exception as exc:
        raise UsageError(f"hf:{_shown(ref)} could not be loaded: {describe(exc)}") from exc
    splits = [str(s) for s in (data.info.splits or {})]
    _say_split(f"hf:{_shown(ref)}", split or "train", splits, split, len(data))
    return data


SKLEARN_SETS = ("digits", "iris", "wine", "breast_cancer")


def sklearn(ref: str):
    """scikit-learn's bundled data: digits (8x8 grayscale images), iris, wine, breast_cancer."""
    if ref not in SKLEARN_SETS:
        raise UsageError(
            f"sklearn:{_shown(ref)} is not bundled; choose one of {', '.join(SKLEARN_SETS)}"
        )
    return _sklearn_dataset(ref)


def _sklearn_dataset(ref: str):
    import datasets
    import numpy as np
    from sklearn import datasets as bundled

    data = getattr(bundled, f"load_{ref}")()
    names = [str(n) for n in data.target_names]
    label = datasets.ClassLabel(names=names)
    if ref == "digits":
        images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
        features = datasets.Features({"image": datasets.Image(), "label": label})
        columns = {"image": list(images), "label": data.target.tolist()}
    else:
        keys = [
            str(n).replace(" ", "_").replace("(", "").replace(")", "") for n in data.feature_names
        ]
        features = datasets.Features(
            {**{k: datasets.Value("float32") for k in keys}, "label": label}
        )
        columns = {
            **{k: data.data[:, i].tolist() for i, k in enumerate(keys)},
            "label": data.target.tolist(),
        }
    dataset = datasets.Dataset.from_dict(columns, features=features)
    dataset._fingerprint = f"sklearn-{ref}-v1"
    return dataset


@kdplug.hookimpl
def register_datasets(register):
    register("disk", disk)
    register("parquet", parquet)
    register("csv", csv)
    register("imagefolder", imagefolder)
    register("hf", hf)
    register("sklearn", sklearn)
