"""Opening a finished store: its memory-mapped arrays, checks, and rows read back.

``open_store(path)`` refuses a directory that is not a finished, intact store. A consumer
then checks that the store is current: ``check_teachers`` re-hashes the teachers' files
(where they still exist) and ``split_for`` finds a DATA's rows by its fingerprint. Both
refuse a stale store unless ``force``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug.augment_views import ViewAugment, rebuild_views
from kdplug.data import DataSource
from kdplug.errors import UsageError
from kdplug.file_hashes import file_hashes
from kdplug.store.layout import (
    FORMAT,
    FORMAT_VERSION,
    RUN_FILE,
    STORE_FILE,
    array_layout,
    split_dir,
)
from kdplug.store.topk import full_log_probs
from kdplug.teacher_names import teacher_names

log = logging.getLogger("kdplug")

FORCE_HINT = "--force (force=true in a store spec)"
MAX_LOG_PROB = 1e-3  # a stored log-probability above this (rounding aside) is corrupt
# what each array checked when read must not hold (Store._refuse names it)
CORRUPT = {
    "values": "NaN, Inf or positive log-probabilities",
    "tail": "NaN, Inf or positive log-probabilities",
    "indices": "class indices outside the store's classes",
    "boxes": "crop boxes outside [0, 1] (or NaN)",
}


@dataclass
class Split:
    """One cached DATA: ``arrays`` are read-only memory maps (see kdplug.store.layout)."""

    name: str
    data: str
    fingerprint: str
    rows: int
    input_shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]


class Store:
    """A finished teacher store (``open_store``)."""

    def __init__(self, path: Path, info: dict[str, Any], splits: list[Split]):
        self.path = path
        self.info = info
        self.splits = splits
        self.classes: list[str] = list(info["classes"])
        self.teachers: list[dict[str, Any]] = list(info["teachers"])
        self.topk: int | None = info["topk"]
        self.views: int = info["views"]
        self.augment = ViewAugment.from_dict(info["augment"]) if info["augment"] else None
        known = torch.ones(len(self.teachers), len(self.classes), dtype=torch.bool)
        for k, teacher in enumerate(self.teachers):
            unknown = teacher["unknown_classes"]
            if not all(isinstance(c, int) and 0 <= c < len(self.classes) for c in unknown):
                raise ValueError(
                    f"{STORE_FILE}: unknown_classes {unknown} of teacher {teacher['spec']} "
                    f"are not all class indices in 0..{len(self.classes) - 1}"
                )
            known[k, unknown] = False
        self.known = known  # [T, C]
        # what tables call them: the names they were cached under (older stores: their specs')
        derived = teacher_names([teacher["spec"] for teacher in self.teachers])
        self.names = [str(t.get("name") or d) for t, d in zip(self.teachers, derived)]

    def check_teachers(self, force: bool = False) -> None:
        """Refuse the store when a teacher file it was made from has changed since.

        Files that no longer exist cannot be checked (the store works without them).
        """
        hashes = file_hashes(file for teacher in self.teachers for file in teacher["files"])
        for teacher in self.teachers:
            for file, stored in teacher["files"].items():
                current = hashes.get(str(Path(file)))
                if current is None:
                    log.info(
                        "teacher file %s is gone; store %s not checked against it", file, self.path
                    )
                    continue
                if current == stored:
                    continue
                message = (
                    f"store {self.path} was cached from teacher {teacher['spec']}, whose file "
                    f"{file} has changed since ({stored[:19]}... then, {current[:19]}... now); "
                    f"re-run kdplug cache, or pass {FORCE_HINT} to use the stored outputs anyway"
                )
                if not force:
                    raise UsageError(message)
                log.warning("%s (forced)", message)

    def split_for(self, source: DataSource, force: bool = False) -> Split:
        """The split holding ``source``'s rows: same data fingerprint and row count.

        With ``force``, a split cached from the same DATA spec and row count is accepted
        even though its fingerprint differs (the data changed since it was cached).
        """
        for split in self.splits:
            if source.fingerprint and split.fingerprint == source.fingerprint:
                if split.rows == len(source):
                    return split
        same_spec = [s for s in self.splits if s.data == source.spec and s.rows == len(source)]
        if same_spec and (force or not source.fingerprint):
            log.warning(
                "using %s of store %s for %s by its DATA spec: its fingerprint %s",
                same_spec[0].name,
                self.path,
                source.spec,
                "could not be checked" if not source.fingerprint else "differs (forced)",
            )
            return same_spec[0]
        if same_spec:
            raise UsageError(
                f"{source.spec} has changed since it was cached into store {self.path} "
                f"(data fingerprint {same_spec[0].fingerprint} then, {source.fingerprint} now); "
                f"re-run kdplug cache, or pass {FORCE_HINT} to use the stored outputs anyway"
            )
        held = "; ".join(f"{s.name}: {s.data} ({s.rows} rows)" for s in self.splits)
        raise UsageError(
            f"store {self.path} holds no split for {source.spec} ({len(source)} rows, "
            f"fingerprint {source.fingerprint or 'none'}); it holds {held}. "
            "Cache this data into the store with kdplug cache --data"
        )

    def read(
        self, split: Split, rows: np.ndarray, views: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher log-probabilities ``[T, B, C]`` (float32, rebuilt from top-k where the store
        holds top-k) of ``rows [B]`` at ``views [B]``, and the bad-view mask ``[B]``, on the
        CPU where the store is (callers copy them to their device once)."""
        values = torch.from_numpy(np.asarray(split.arrays["values"][rows, views]))
        self._refuse(split, "values", rows, ~torch.isfinite(values) | (values > MAX_LOG_PROB))
        indices, tail = None, None
        if "indices" in split.arrays:
            indices = torch.from_numpy(np.asarray(split.arrays["indices"][rows, views]))
            self._refuse(split, "indices", rows, (indices < 0) | (indices >= len(self.classes)))
            indices = indices.permute(1, 0, 2)
            tail = torch.from_numpy(np.asarray(split.arrays["tail"][rows, views]))
            self._refuse(split, "tail", rows, ~torch.isfinite(tail) | (tail > MAX_LOG_PROB))
            tail = tail.permute(1, 0)
        logits = full_log_probs(values.permute(1, 0, 2), indices, tail, self.known)
        bad = torch.from_numpy(np.asarray(split.arrays["bad"][rows, views]))
        return logits, bad

    def _refuse(self, split: Split, name: str, rows: np.ndarray, wrong: torch.Tensor) -> None:
        """Refuse the store when ``wrong`` (one entry or more per row of ``rows``) holds
        a True: that array's values are outside what kdplug cache writes."""
        bad = wrong.reshape(len(rows), -1).any(1).numpy()
        if bad.any():
            raise UsageError(
                f"store {self.path} is corrupt: {split.name}/{name}.npy holds {CORRUPT[name]} "
                f"for rows {rows[bad][:5].tolist()} of {split.data}; re-run kdplug cache "
                "with --overwrite"
            )

    def view_inputs(
        self, split: Split, x: torch.Tensor, rows: np.ndarray, views: np.ndarray
    ) -> torch.Tensor:
        """The stored views ``views [B]`` of ``rows [B]`` rebuilt from their inputs ``x``."""
        boxes = torch.from_numpy(np.asarray(split.arrays["boxes"][rows, views]))
        self._refuse(split, "boxes", rows, ~((boxes >= 0) & (boxes <= 1)))
        flips = torch.from_numpy(np.asarray(split.arrays["flips"][rows, views]))
        seeds = torch.from_numpy(np.asarray(split.arrays["seeds"][rows, views]))
        return rebuild_views(x, boxes, flips, seeds, self.augment)


def open_store(path: str | Path) -> Store:
    """Open the store at ``path``; a missing, unfinished or damaged store is a UsageError."""
    path = Path(path)
    info_file = path / STORE_FILE
    if not info_file.is_file():
        if (path / RUN_FILE).is_file():
            raise UsageError(
                f"store {path} is unfinished (kdplug cache was interrupted); finish it with "
                "the same kdplug cache command and --resume"
            )
        what = "does not exist" if not path.exists() else "is not a kdplug store (no store.json)"
        raise UsageError(f"store {path} {what}")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        if info.get("format") != FORMAT:
            raise ValueError("not a kdplug store")
        if info.get("format_version") != FORMAT_VERSION:
            raise UsageError(
                f"store {path} has format version {info.get('format_version')}; this kdplug "
                f"reads version {FORMAT_VERSION} (re-run kdplug cache)"
            )
        splits = [_open_split(path, i, entry, info) for i, entry in enumerate(info["splits"])]
        return Store(path, info, splits)
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UsageError(
            f"store {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "re-run kdplug cache with --overwrite"
        ) from None


def _open_split(path: Path, index: int, entry: dict[str, Any], info: dict[str, Any]) -> Split:
    directory = path / split_dir(index)
    arrays = {}
    for name, (shape, dtype) in array_layout(info, entry["rows"]).items():
        file = directory / f"{name}.npy"
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(
                f"{file.relative_to(path)} holds {array.dtype}{list(array.shape)}, "
                f"expected {dtype}{list(shape)}"
            )
        arrays[name] = array
    return Split(
        name=split_dir(index),
        data=entry["data"],
        fingerprint=entry["fingerprint"],
        rows=entry["rows"],
        input_shape=tuple(entry["input_shape"]),
        arrays=arrays,
    )
