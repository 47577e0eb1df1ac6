"""One stored teacher served by row index (``uses_row_index = True``).

Row ``i`` of the split is row ``i`` of the data the teacher is used with. A teacher is not
told which data that is, so the split is chosen by ``split=I`` (or is the store's only
split) and checked where the engines check row-indexed teachers: its row count
(``num_rows``) and the fingerprint of the data it was cached from (``data_fingerprint``;
not with ``force=true``), by ``label``, ``teachers report`` and ``cache``; ``distill``
checks the row count. Every row index asked for is checked too.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from kdplug.api import STORE_FILE, Split, Store, UsageError, open_store, to_device


class StoreTeacher:
    """``teacher(x, index [B]) -> log-probabilities [B, C_k]`` of stored teacher ``k`` at
    view 0, over the classes it knows (``classes``)."""

    uses_row_index = True
    uses_inputs = False  # kdplug cache need not decode the data for it

    def __init__(
        self, store: Store, split: Split, teacher: int, fingerprint: str, force: bool = False
    ):
        self.store = store
        self.split = split
        self.teacher = teacher
        self.name = store.names[teacher]
        self.columns = store.known[teacher].nonzero().flatten()
        self.classes = [store.classes[c] for c in self.columns.tolist()]
        self.fingerprint = fingerprint
        self.num_rows = split.rows
        self.data_fingerprint = None if force else split.fingerprint
        self.source = f"store:{store.path}"

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(index).cpu().numpy()
        if len(rows) and (rows.max() >= self.num_rows or rows.min() < 0):
            raise UsageError(
                f"{self.source} {self.split.name} has {self.num_rows} rows but data row "
                f"{int(rows.max())} was asked for; use it with the data it was cached from"
            )
        logits, _ = self.store.read(self.split, rows, np.zeros(len(rows), dtype=np.int64))
        return to_device(logits[self.teacher][:, self.columns], x.device)


def load_store_teacher(ref: str, teacher: int, split: int | None, force: bool) -> StoreTeacher:
    """Open the store at ``ref`` and pick teacher ``teacher`` of split ``split``."""
    source = f"store:{ref}"
    store = open_store(ref)
    if not 0 <= teacher < len(store.teachers):
        specs = "; ".join(f"{k}: {t['spec']}" for k, t in enumerate(store.teachers))
        raise UsageError(
            f"{source}: teacher must be in 0..{len(store.teachers) - 1}, got {teacher} ({specs})"
        )
    splits = "; ".join(f"{i}: {s.data} ({s.rows} rows)" for i, s in enumerate(store.splits))
    if split is None and len(store.splits) > 1:
        raise UsageError(f"{source}: the store holds several splits; choose split=I ({splits})")
    split = 0 if split is None else split
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < len(store.splits):
        raise UsageError(
            f"{source}: split must be in 0..{len(store.splits) - 1}, got {split!r} ({splits})"
        )
    store.check_teachers(force)
    digest = hashlib.sha256((store.path / STORE_FILE).read_bytes())
    digest.update(f"#teacher={teacher}#split={split}".encode())
    return StoreTeacher(
        store, store.splits[split], teacher, "sha256:" + digest.hexdigest(), force=force
    )
