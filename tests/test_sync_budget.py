"""The sync budget: a training step and a label batch make the host wait for the device at
most once (``tests/sync_trace.py`` counts, on the CPU, the calls kdplug's own code makes
that would wait for a GPU). Cases cover what the step runs: class alignment of a teacher
that names a subset of the classes, ``auto`` over one and two teachers, DKD, a store."""

from __future__ import annotations

import numpy as np
import pytest

from tests.sync_trace import SyncCounter

CLASSES = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """300 digits on disk, and precomputed teachers over them: all ten classes, unnamed;
    nine named classes."""
    from kdplug.data import load_data

    root = tmp_path_factory.mktemp("sync")
    load_data("sklearn:digits").dataset.select(range(300)).save_to_disk(str(root / "train"))
    rng = np.random.default_rng(0)
    np.save(root / "all.npy", rng.normal(size=(300, 10)).astype(np.float32))
    np.save(root / "nine.npy", rng.normal(size=(300, 9)).astype(np.float32))
    return {
        "root": root,
        "data": f"disk:{root / 'train'}",
        "all": f"logits:{root / 'all.npy'}",
        "nine": f"logits:{root / 'nine.npy'},classes={';'.join(CLASSES[:9])}",
    }


def counted_steps(monkeypatch, **config) -> list:
    """Run a one-epoch distill; return each training step's syncs by kdplug line."""
    from kdplug.engines import distill as engine

    steps = []
    real_step = engine.Trainer.step

    def step(self, *args):
        with SyncCounter() as syncs:
            out = real_step(self, *args)
        steps.append(syncs)
        return out

    monkeypatch.setattr(engine.Trainer, "step", step)
    engine.distill(
        engine.DistillConfig(
            student="timm:test_resnet", epochs=1, batch_size=64, device="cpu", **config
        )
    )
    return steps


def over_budget(counted: list) -> list:
    return [dict(c.where) for c in counted if c.total > 1]


@pytest.mark.parametrize(
    "teachers,combiner,loss",
    [(["all", "nine"], "auto", "dkd"), (["all"], "auto", "kd"), (["nine"], "mean", "kd")],
)
def test_a_training_step_waits_for_the_device_at_most_once(
    rows, tmp_path, monkeypatch, teachers, combiner, loss
):
    steps = counted_steps(
        monkeypatch,
        train=rows["data"],
        teachers=[rows[t] for t in teachers],
        combiner=combiner,
        loss=loss,
        out=str(tmp_path / "run"),
    )
    assert len(steps) == 4 and over_budget(steps) == []


def test_a_step_from_a_store_waits_at_most_once(rows, tmp_path, monkeypatch):
    from kdplug.engines.cache import CacheConfig, run_cache

    store = tmp_path / "store"
    run_cache(CacheConfig([rows["all"], rows["nine"]], [rows["data"]], str(store), progress=False))
    steps = counted_steps(
        monkeypatch, train=rows["data"], store=str(store), combiner="mean", out=str(tmp_path / "d")
    )
    assert len(steps) == 4 and over_budget(steps) == []


def test_a_label_batch_waits_for_the_device_at_most_once(rows, tmp_path, monkeypatch):
    from kdplug.engines import label as engine

    batches = []
    real_rows = engine.label_rows

    def label_rows(batches_of_rows, *args):
        def counted():  # each batch's loop body runs inside its own counter
            for batch in batches_of_rows:
                batches.append(SyncCounter())
                with batches[-1]:
                    yield batch

        return real_rows(counted(), *args)

    monkeypatch.setattr(engine, "label_rows", label_rows)
    engine.run_label(
        engine.LabelConfig(
            teachers=[rows["all"], rows["nine"]],
            data=rows["data"],
            out=str(tmp_path / "labels"),
            batch_size=64,
            device="cpu",
            progress=False,
        )
    )
    assert len(batches) == 5 and over_budget(batches) == []
