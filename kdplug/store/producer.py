"""The store as distill's teacher-output producer (``kdplug distill --store STORE``): a
``kdplug.components.Producer`` with ``rebuild_views`` and ``set_epoch``.

distill's rows are the train rows ``0..N-1`` then the unlabeled rows ``N..`` (see
``kdplug.engines.distill.TrainRows``); each maps to its split of the store by data fingerprint.
In each epoch every row is given one of its stored views, as FKD does: a fixed function of
``--seed``, the epoch and the row (``view_of``), so the training loader's workers rebuild
its input (``rebuild_views(x, idx, epoch)``) and ``producer(x, idx)`` serves that view's
stored outputs (after ``set_epoch``) with nothing passed between them, the same after
``--resume``. Before the first epoch (the combiner's fit on the labeled rows) every row
is given view 0, the plain input.
"""

from __future__ import annotations

import numpy as np
import torch

from kdplug.augment_views import seeded_uniform
from kdplug.data import DataSource
from kdplug.errors import UsageError
from kdplug.spec import parse_spec
from kdplug.store.reader import Split, Store, open_store
from kdplug.teachers import TeacherOutputs


class StoreProducer:
    """``producer(x, idx) -> TeacherOutputs`` from a store; see the module docstring."""

    def __init__(self, store: Store, parts: list[tuple[Split, int]], seed: int = 0):
        self.store = store
        self.parts = parts  # (split, first distill row)
        self.names = list(store.names)
        self.specs = [teacher["spec"] for teacher in store.teachers]
        self.known = store.known
        self.rows = sum(split.rows for split, _ in parts)
        self.seed = seed
        self.epoch: int | None = None  # None: before training, view 0 for every row

    def set_epoch(self, epoch: int | None) -> None:
        """Serve the views of ``epoch`` from now on (None: view 0)."""
        self.epoch = epoch

    def view_of(self, rows: np.ndarray, epoch: int | None) -> np.ndarray:
        """``[B]`` int64: the stored view each of ``rows`` is given in ``epoch``, uniform over
        the ``V`` views (view 0 included) from a hash of ``--seed``, the epoch and the row;
        0 for every row when ``epoch`` is None."""
        if epoch is None or self.store.views == 1:
            return np.zeros(len(rows), dtype=np.int64)
        with np.errstate(over="ignore"):  # a key per (seed, row): wrapping is fine
            keys = np.asarray(rows, dtype=np.uint64) + np.uint64(self.seed) * np.uint64(2**40)
        draws = seeded_uniform(keys, epoch)
        return np.minimum((draws * self.store.views).astype(np.int64), self.store.views - 1)

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

    def rebuild_views(self, x: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """The inputs of the views the rows ``idx`` have in ``epoch``, rebuilt from their
        plain inputs ``x [B, C, H, W]`` (a CPU batch: in the training loader's workers)."""
        rows = idx.cpu().numpy()
        if self.store.views == 1:
            return x
        picks = self.view_of(rows, epoch)
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
            views = self.view_of(rows[positions], self.epoch)
            values, flagged = self.store.read(split, split_rows, views)
            logits[:, part], bad[part] = values, flagged
        flagged = bool(bad.any())  # a CPU tensor: no wait for the GPU
        if x.device.type == "cuda":
            logits, bad = (t.pin_memory().to(x.device, non_blocking=True) for t in (logits, bad))
        return TeacherOutputs(logits, self.known, bad if flagged else None)


def store_producer(
    spec: str,
    train: DataSource,
    unlabeled: DataSource | None,
    classes: list[str],
    seed: int = 0,
) -> StoreProducer:
    """The producer for ``--store STORE[,force=true]`` serving ``train`` then ``unlabeled``
    (``seed``: the run's, which picks the rows' views in each epoch)."""
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
    return StoreProducer(store, parts, seed)
