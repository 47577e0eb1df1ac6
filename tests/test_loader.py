"""distill's training loader: the per-image augmentation runs in its workers, the workers
persist across epochs, and each epoch's batches are the ones a fixed seed always gave."""

import os

import pytest
import torch

from kdplug import augment as augment_module
from kdplug.data import batches, load_data
from kdplug.engines.distill import DistillConfig, TrainRows, distill, train_loader


def config(digits_splits, tmp_path, **values) -> DistillConfig:
    settings = dict(
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        out=str(tmp_path / "run"),
        loss="ce",
        batch_size=32,
        seed=3,
        epochs=2,
        device="cpu",
    )
    return DistillConfig(**{**settings, **values})


def epochs_of(loader, epochs) -> list[list[tuple[torch.Tensor, ...]]]:
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.append(list(loader))
    return out


@pytest.fixture
def augment_pids(tmp_path, monkeypatch):
    """The process ids that ran ``Augment`` (written to a file: workers are processes)."""
    record = tmp_path / "pids"
    real = augment_module.Augment.__call__

    def call(self, image):
        with open(record, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(self, image)

    monkeypatch.setattr(augment_module.Augment, "__call__", call)
    return lambda: {int(line) for line in record.read_text().split()}


def test_distill_augments_in_the_loader_workers_not_in_the_step(
    digits_splits, tmp_path, augment_pids
):
    distill(config(digits_splits, tmp_path, augment="scale=0.5;1,hflip=0", workers=1, epochs=1))
    assert augment_pids() and os.getpid() not in augment_pids()


def test_the_loader_and_its_workers_persist_across_epochs(digits_splits, tmp_path, augment_pids):
    rows = TrainRows(load_data(digits_splits["labeled"]), None)
    loader = train_loader(
        rows, config(digits_splits, tmp_path, augment="default", workers=2), False
    )
    loader.set_epoch(0)
    first = list(loader)
    iterator = loader._iterator
    workers = {w.pid for w in iterator._workers}
    loader.set_epoch(1)
    second = list(loader)
    assert loader._iterator is iterator and {w.pid for w in iterator._workers} == workers
    assert all(w.is_alive() for w in iterator._workers)
    assert augment_pids() == workers  # every image augmented in the two workers
    assert len(first) == len(second) == 4  # 150 rows, batches of 32, the last dropped
    assert [i.tolist() for _, _, i in first] != [i.tolist() for _, _, i in second]


def test_each_epochs_batches_are_those_the_per_epoch_loader_gave(digits_splits, tmp_path):
    """The order of old distill (one ``batches(shuffle=True, epoch=e)`` loader per epoch)."""
    rows = TrainRows(load_data(digits_splits["labeled"]), load_data(digits_splits["test"]))
    loader = train_loader(rows, config(digits_splits, tmp_path, workers=0), False)
    for epoch, got in enumerate(epochs_of(loader, range(3))):
        old = batches(rows, 32, shuffle=True, seed=3, epoch=epoch, workers=0, drop_last=True)
        for (x, y, idx), (x0, y0, idx0) in zip(got, old, strict=True):
            assert torch.equal(idx, idx0) and torch.equal(y, y0) and torch.equal(x, x0)


def test_augmented_batches_depend_on_seed_and_epoch_alone(digits_splits, tmp_path):
    """Any number of workers, a resumed epoch, and the main process's streams untouched."""
    rows = TrainRows(load_data(digits_splits["labeled"]), None)
    make = lambda workers, seed=3: train_loader(  # noqa: E731
        rows, config(digits_splits, tmp_path, augment="default", workers=workers, seed=seed), False
    )
    torch.manual_seed(0)
    in_process = epochs_of(make(0), [0, 1])
    after = torch.rand(3)
    resumed = epochs_of(make(2), [1])[0]  # workers, started at epoch 1
    for (x, _, idx), (x1, _, idx1) in zip(in_process[1], resumed, strict=True):
        assert torch.equal(idx, idx1) and torch.equal(x, x1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # iterating drew nothing from torch's stream
    plain = epochs_of(make(0, seed=4), [1])[0][0][0]
    assert not torch.equal(in_process[1][0][0], plain)  # another seed, other views
    x, _, idx = in_process[0][0]
    decoded, _, _ = rows.batch(idx.tolist())
    assert x.shape == decoded.shape and not torch.equal(x, decoded) and 0 <= x.min() <= x.max() <= 1


def test_class_ids_are_read_as_one_arrow_column_not_row_by_row(monkeypatch):
    """``labels()`` of a ClassLabel column (an imagefolder's): missing ones -1, selections
    kept, and no Python loop over the rows (1.28M rows took minutes that way)."""
    import datasets
    import numpy as np

    from kdplug.data import DataSource, describe

    features = datasets.Features(
        {"x": datasets.Value("float32"), "label": datasets.ClassLabel(num_classes=3)}
    )
    rows = {"x": [0.0, 1.0, 2.0, 3.0, 4.0], "label": [1, None, -1, 2, 0]}
    dataset = datasets.Dataset.from_dict(rows, features=features)
    source, picked = describe(dataset, "t"), describe(dataset.select([4, 0, 1]), "t")
    monkeypatch.setattr(DataSource, "_labels", lambda self, rows: pytest.fail("row by row"))
    assert source.labels().tolist() == [1, -1, -1, 2, 0] and source.labels().dtype == np.int64
    assert picked.labels().tolist() == [0, 1, -1]


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_runs_the_planned_updates_on_its_share(
    digits_splits, tmp_path, monkeypatch, world
):
    """Under torchrun every rank's loader gives its ``DistributedSampler`` share of each
    epoch in as many batches as the LR schedule planned."""
    from kdplug import distributed
    from kdplug.data import batches_of
    from kdplug.engines.distill import updates_per_epoch

    rows = TrainRows(load_data(digits_splits["test"]), None)  # 447 rows
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        loader = train_loader(rows, config(digits_splits, tmp_path, batch_size=16), False)
        loader.set_epoch(2)
        chunks = list(loader.sampler)
        assert len(chunks) == len(loader) == updates_per_epoch(distributed.rows_per_rank(447), 16)
        share = distributed.epoch_rows(447, 3, 2)
        assert [chunk.rows for chunk in chunks] == batches_of(share, 16, drop_last=True)
