"""The labeled dataset ``kdplug label`` writes: its columns, and a writer that adds them one
shard at a time as Arrow record batches (no per-row Python), into a directory that
``datasets.load_from_disk`` opens memory-mapped.

``--probs`` says how each row's soft label is kept: ``full`` (``probs``, C floats),
``topk=K`` (``topk_indices``, ``topk_values``) or ``none``. The default, ``auto``, keeps
the generator's top-k where it has one, else all of ``probs`` up to ``FULL_PROBS_UP_TO``
classes and the top ``AUTO_TOPK`` above: full probabilities of 1.28M rows of 1,000 classes
are 5 GB of float32, their top 10 are 0.1 GB and hold nearly all the mass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug.errors import UsageError
from kdplug.ops import argmax, entropy

log = logging.getLogger("kdplug")

FULL_PROBS_UP_TO = 100
AUTO_TOPK = 10


def probs_mode(text: str, generator_topk: int | None, C: int) -> tuple[str, int | None]:
    """``(mode, k)`` for ``--probs TEXT`` (``auto``, ``full``, ``topk=K``, ``none``): ``mode``
    is ``full``, ``topk`` or ``none``; ``auto`` is decided (and said) here."""
    text = text.strip() if isinstance(text, str) else ""
    if text == "auto":
        if generator_topk is not None:
            return "topk", min(generator_topk, C)
        if C <= FULL_PROBS_UP_TO:
            return "full", None
        log.info(
            "--probs auto: %d classes, so each row keeps its top %d probabilities "
            "(topk_indices, topk_values) instead of all of them (--probs full keeps them)",
            C,
            AUTO_TOPK,
        )
        return "topk", AUTO_TOPK
    if text in ("full", "none"):
        return text, None
    found = re.fullmatch(r"topk=(\d+)", text)
    if found and int(found.group(1)) >= 1:
        return "topk", min(int(found.group(1)), C)
    raise UsageError(f"--probs must be auto, full, topk=K (K >= 1) or none, got {text!r}")


def describe_mode(mode: str, k: int | None) -> str:
    return f"topk={k}" if mode == "topk" else mode


def features(
    classes: list[str], mode: str, k: int | None, private: bool, keys: list[str] = ()
) -> Any:
    """The ``datasets.Features`` of our columns (``keys``: ``file``, ``id``; see
    ``kdplug.row_keys``)."""
    import datasets

    found = {
        "index": datasets.Value("int64"),
        **{key: datasets.Value("string") for key in keys},
        "label": datasets.ClassLabel(names=classes),
        "accepted": datasets.Value("bool"),
        "confidence": datasets.Value("float32"),
        "entropy": datasets.Value("float32"),
    }
    if not private:
        found["agreement"] = datasets.Value("float32")
    if mode == "full":
        found["probs"] = datasets.Sequence(datasets.Value("float32"), length=len(classes))
    elif mode == "topk":
        found["topk_indices"] = datasets.Sequence(datasets.Value("int64"), length=k)
        found["topk_values"] = datasets.Sequence(datasets.Value("float32"), length=k)
    return datasets.Features(found)


def shard_columns(
    start: int,
    label: torch.Tensor,
    accepted: torch.Tensor,
    probs: torch.Tensor,
    votes: torch.Tensor,
    private: bool,
) -> dict[str, np.ndarray]:
    """One shard's columns as arrays (``probs [R, C]``, the rest ``[R]``), rows from
    ``start``. ``agreement`` is the fraction of teachers whose vote (``votes [K, R]``) is
    the row's class: its label, or the argmax of its probs where rejected. ``predicted``
    (the probs' argmax) is not written: the report's tally reads it."""
    confidence = probs.amax(1)  # amax and argmax: twice as fast as max on the CPU
    predicted = argmax(probs)
    row_class = torch.where(accepted, label, predicted)
    columns = {
        "index": np.arange(start, start + len(label), dtype=np.int64),
        "label": label.numpy(),
        "accepted": accepted.numpy(),
        "confidence": confidence.numpy(),
        "entropy": entropy(probs).float().numpy(),
        "probs": probs.numpy(),
        "predicted": predicted.numpy(),
    }
    if not private:
        columns["agreement"] = (votes == row_class).float().mean(0).numpy()
    return columns


def arrow_table(columns: dict[str, np.ndarray], schema: Any, mode: str, k: int | None) -> Any:
    """The shard's columns as a ``pyarrow.Table`` of ``schema`` (our features'
    ``arrow_schema``; fixed-size lists built from the flat arrays, no per-row Python)."""
    import pyarrow as pa

    probs = columns["probs"]
    lists = {"probs": probs}
    if mode == "topk":
        values, indices = torch.from_numpy(probs).topk(k, dim=1)
        lists = {"topk_indices": indices.numpy(), "topk_values": values.numpy()}
    arrays = {}
    for name in schema.names:
        if name in lists:
            flat = lists[name]
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat.reshape(-1), flat.shape[1])
        elif isinstance(columns[name], pa.Array):  # a row key, read as Arrow
            arrays[name] = columns[name]
        else:
            arrays[name] = pa.array(columns[name])
    return pa.Table.from_arrays(list(arrays.values()), schema=schema)


class DatasetWriter:
    """Writes a ``datasets`` directory one table at a time: one Arrow file per table, then
    the ``state.json`` and ``dataset_info.json`` that ``datasets.load_from_disk`` reads.

    Each file is what ``datasets.arrow_writer.ArrowWriter`` writes (an Arrow stream of
    ``feats.arrow_schema``, record batches of ``datasets.config.DEFAULT_MAX_BATCH_SIZE``
    rows, local image/audio files embedded), with the schema made once: ArrowWriter remakes
    it for each file, about 40 ms with a ClassLabel of 1,000 names."""

    def __init__(self, directory: Path, feats: Any, tables: int):
        from datasets.features.features import require_storage_embed

        self.directory, self.features, self.tables = Path(directory), feats, tables
        self.schema = feats.arrow_schema
        self.embed = any(require_storage_embed(feature) for feature in feats.values())
        self.files: list[str] = []

    def write(self, table: Any) -> None:
        import pyarrow as pa
        from datasets import config
        from datasets.table import embed_table_storage

        if self.embed:
            table = embed_table_storage(table, local_files=True, remote_files=False)
        name = f"data-{len(self.files):05d}-of-{self.tables:05d}.arrow"
        with pa.OSFile(str(self.directory / name), "wb") as sink:
            with pa.ipc.new_stream(sink, self.schema) as writer:
                writer.write_table(table, max_chunksize=config.DEFAULT_MAX_BATCH_SIZE)
        self.files.append(name)

    def close(self) -> None:
        """Write the metadata (after the last table); the tables written must be all."""
        import datasets
        from datasets.utils.py_utils import asdict

        if len(self.files) != self.tables:
            raise RuntimeError(f"wrote {len(self.files)} tables of {self.tables}")
        info = asdict(datasets.DatasetInfo(features=self.features))
        digest = hashlib.sha256(json.dumps([self.files, str(self.features)]).encode())
        state = {
            "_data_files": [{"filename": name} for name in self.files],
            "_fingerprint": digest.hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        (self.directory / "dataset_info.json").write_text(
            json.dumps({key: info[key] for key in sorted(info)}, indent=2)
        )
