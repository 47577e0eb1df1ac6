"""Precomputed teacher outputs read from a file and served by dataset row index.

Row ``i`` of the array is row ``i`` of the dataset the teacher is used with: the teacher
has ``uses_row_index = True`` and the teacher set calls it as ``teacher(x, index)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug.api import (
    UsageError,
    class_names,
    existing_file,
    file_hash,
    looks_like_probs,
    probability_flag,
    probs_to_logits,
    to_device,
)

SUFFIXES = ".npy, .safetensors, .parquet or a saved dataset directory"


class LogitsTeacher:
    """``teacher(x, index [B]) -> logits [B, C]``: rows ``index`` of a ``[N, C]`` array."""

    uses_row_index = True
    uses_inputs = False  # kdplug cache need not decode the data for it

    def __init__(
        self,
        array: Any,
        probs: bool,
        classes: list[str] | None,
        path: Path,
        source: str,
    ):
        self.array = array  # [N, C] numpy array (possibly memory-mapped)
        self.probs = probs
        self.classes = classes
        self.path = path
        self.source = source
        self.num_rows = len(array)

    @property
    def fingerprint(self) -> str:
        """The file's hash, taken when first asked for: a file of gigabytes is hashed in
        the background while a run starts (``kdplug.file_hashes``)."""
        return file_hash(self.path)

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(index).cpu().numpy()
        if len(rows) and (rows.max() >= self.num_rows or rows.min() < 0):
            raise UsageError(
                f"{self.source} has {self.num_rows} rows but data row {int(rows.max())} was "
                "asked for; row i of the file must be row i of the data"
            )
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            block = self.array[rows[0] : rows[-1] + 1]  # a run of rows: a view, no gather
        else:
            block = self.array[rows]
        # float32 rows of a memory-mapped .npy stay a view of the file: the teacher set reads
        # them once, into its batch; nothing writes them (copy-on-write, were it to)
        values = torch.from_numpy(np.asarray(block, dtype=np.float32))
        return to_device(probs_to_logits(values) if self.probs else values, x.device)


def load_logits(ref: str, key: Any, column: Any, probs: Any, classes: Any) -> LogitsTeacher:
    """Read ``ref`` (by suffix, or a directory as a saved HF dataset) into a LogitsTeacher."""
    source = f"logits:{ref}"
    path = existing_file(ref, "logits")
    flag = probability_flag(probs, source)
    names = class_names(classes, source)
    if path.is_dir() or path.suffix == ".parquet":
        array = _read_table(path, column, source)
    elif path.suffix == ".npy":
        array = _read_npy(path, source)
    elif path.suffix == ".safetensors":
        array = _read_safetensors(path, key, source)
    else:
        raise UsageError(f"{source}: unknown file type {path.suffix!r}; use {SUFFIXES}")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UsageError(f"{source}: expected a [rows, classes] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"{source}: expected numbers, got dtype {array.dtype}")
    if names is not None and len(names) != array.shape[1]:
        raise UsageError(
            f"{source}: {len(names)} class names given but the file has {array.shape[1]} columns"
        )
    is_probs = looks_like_probs(array) if flag is None else flag
    return LogitsTeacher(array, is_probs, names, path, source)


def _read_npy(path: Path, source: str) -> np.ndarray:
    try:
        # copy-on-write: writable, so torch takes rows as a view without a warning (a write
        # would stay in this process)
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(
            f"{source}: cannot read {path} as a .npy array (corrupt, truncated or an object "
            f"array, which would need pickle): {exc}"
        ) from None


def _read_safetensors(path: Path, key: Any, source: str) -> np.ndarray:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
            if key is None and len(keys) != 1:
                raise UsageError(f"{source}: holds tensors {keys}; choose one with key=NAME")
            key = keys[0] if key is None else str(key)
            if key not in keys:
                raise UsageError(f"{source}: no tensor {key!r} (tensors: {keys})")
            return handle.get_tensor(key)
    except UsageError:
        raise
    except Exception as exc:  # SafetensorError, OSError, ... for a bad file
        raise UsageError(
            f"{source}: cannot read {path} as safetensors (corrupt or truncated): {exc}"
        ) from None


def _read_table(path: Path, column: Any, source: str) -> np.ndarray:
    """One list-valued column of a parquet file or a save_to_disk dataset, as ``[N, C]``."""
    import datasets

    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
        else:
            table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as exc:
        raise UsageError(
            f"{source}: cannot read {path} as parquet or a saved dataset: {exc}"
        ) from None
    if isinstance(table, datasets.DatasetDict):
        if len(table) != 1:
            raise UsageError(f"{source}: holds splits {list(table)}; save one split only")
        table = next(iter(table.values()))
    columns = list(table.column_names)
    if column is None:
        found = [c for c in ("logits", "probs") if c in columns]
        column = columns[0] if len(columns) == 1 else (found[0] if found else None)
        if column is None:
            raise UsageError(f"{source}: choose the column with column=NAME (columns: {columns})")
    if column not in columns:
        raise UsageError(f"{source}: no column {column!r} (columns: {columns})")
    try:
        return np.asarray(table.with_format("numpy")[column], dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"{source}: column {column!r} is not a list of numbers of one length per row: {exc}"
        ) from None
