"""The store as distill's teacher-output producer (``kdplug distill --store STORE``): a
``kdplug.components.Producer`` with ``rebuild_views``.

distill's rows are the train rows ``0..N-1`` then the unlabeled rows ``N..`` (see
``kdplug.engines.distill.TrainRows``); each maps to its split of the store by data fingerprint.
Per training step the engine calls ``rebuild_views(x, idx)``: one stored view per row is
picked at random (torch's global generator, so ``--seed`` fixes it and a resumed run
continues it) and its input rebuilt; then ``producer(x, idx)`` returns the stored teacher
outputs of the views picked last for those rows (view 0 for rows never picked, e.g. while
the engine fits a combiner on the labeled rows).
"""

from __future__ import annotations

import numpy as np
import torch

from kdplug.data import DataSource
from kdplug.errors import UsageError
from kdplug.spec import parse_spec
from kdplug.store.reader import Split, Store, open_store
from kdplug.teachers import TeacherOutputs


class StoreProducer:
    """``producer(x, idx) -> TeacherOutputs`` from a store; see the module docstring."""

    def __init__(self, store: Store, parts: list[tuple[Split, int]]):
        self.store = store
        self.parts = parts  # (split, first distill row)
        self.names = list(store.names)
        self.specs = [teacher["spec"] for teacher in store.teachers]
        self.known = store.known
        self.rows = sum(split.rows for split, _ in parts)
        # the view picked last, per row: the narrowest integer that holds a view (a byte)
        self.view = np.zeros(self.rows, dtype=np.min_scalar_type(store.views - 1))

    def fingerprints(self) -> list[str | None]:
        return [teacher["fingerprint"] for teacher in self.store.teachers]

    def to(self, device: torch.device | str) -> StoreProducer:
        self.known = self.known.to(device)
        return self

    def check_rows(self, rows: int) -> None:
        if rows != self.rows:
            raise UsageError(f"store {self.store.path} serves {self.rows} rows, distill has {rows}")

    def _locate(self, idx: np.ndarray):
        """``(split, positions in the batch, rows of the split)`` for each split in ``idx``."""
        for split, first in self.parts:
            inside = (idx >= first) & (idx < first + split.rows)
            if inside.any():
                positions = np.flatnonzero(inside)
                yield split, positions, idx[positions] - first

    def rebuild_views(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Pick one stored view per row of ``x [B, C, H, W]`` and return the views."""
        rows = idx.cpu().numpy()
        if self.store.views == 1:
            return x
        picks = torch.randint(self.store.views, (len(rows),)).numpy()
        self.view[rows] = picks
        out = x
        for split, positions, split_rows in self._locate(rows):
            part = torch.from_numpy(positions)
            views = self.store.view_inputs(split, x[part], split_rows, picks[positions])
            out = out.clone() if out is x else out
            out[part] = views
        return out

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> TeacherOutputs:
        """The stored outputs ``[T, B, C]`` of the rows ``idx`` at their picked views.

        Read, checked and assembled on the CPU (where the store is), then copied to ``x``'s
        device once, from pinned memory without blocking on CUDA: the step never waits for
        the GPU here."""
        rows = idx.cpu().numpy()
        logits = torch.empty((len(self.names), len(rows), len(self.store.classes)))
        bad = torch.zeros(len(rows), dtype=torch.bool)
        for split, positions, split_rows in self._locate(rows):
            part = torch.from_numpy(positions)
            values, flagged = self.store.read(split, split_rows, self.view[rows[positions]])
            logits[:, part], bad[part] = values, flagged
        flagged = bool(bad.any())  # a CPU tensor: no wait for the GPU
        if x.device.type == "cuda":
            logits, bad = (t.pin_memory().to(x.device, non_blocking=True) for t in (logits, bad))
        return TeacherOutputs(logits, self.known, bad if flagged else None)


def store_producer(
    spec: str, train: DataSource, unlabeled: DataSource | None, classes: list[str]
) -> StoreProducer:
    """The producer for ``--store STORE[,force=true]`` serving ``train`` then ``unlabeled``."""
    parsed = parse_spec(f"store:{spec}")
    unknown = sorted(set(parsed.options) - {"force"})
    if unknown or not isinstance(parsed.options.get("force", False), bool):
        raise UsageError(f"--store {spec}: expected STORE or STORE,force=true")
    force = parsed.options.get("force", False)
    store = open_store(parsed.ref)
    if store.classes != list(classes):
        raise UsageError(
            f"store {store.path} holds classes {store.classes[:20]}, --train has "
            f"{list(classes)[:20]}; cache with --classes in the train data's order"
        )
    store.check_teachers(force)
    parts, first = [], 0
    for source in (train, unlabeled):
        if source is not None:
            split = store.split_for(source, force)
            if split.input_shape != tuple(source.input_shape):
                raise UsageError(
                    f"store {store.path} cached {source.spec} as {list(split.input_shape)} "
                    f"inputs, distill reads {list(source.input_shape)}"
                )
            parts.append((split, first))
            first += split.rows
    return StoreProducer(store, parts)
