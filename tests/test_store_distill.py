"""Using a store: distill --store end to end, the producer's views and outputs, and the
store as a teacher source for `label` and `teachers report`."""

import json

import numpy as np
import pytest
import torch

from kdplug import UsageError
from kdplug.data import load_data
from kdplug.engines.cache import CacheConfig, run_cache
from kdplug.engines.label import LabelConfig, run_label
from kdplug.engines.teachers import report
from kdplug.plugins import create
from kdplug.store.producer import store_producer
from kdplug.store.reader import open_store
from tests.conftest import run_cli
from tests.teacher_fixtures import TinyCNN


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("store-teachers")
    specs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.jit.save(torch.jit.script(TinyCNN().eval()), root / f"t{seed}.pt")
        specs.append(f"torchscript:{root / f't{seed}.pt'},allow_code=true")
    return specs


@pytest.fixture(scope="module")
def store(teachers, digits_splits, tmp_path_factory) -> str:
    """Both teachers on the labeled (150 rows) and test (447 rows, here the unlabeled data)
    splits: 3 views, top-5 in float16."""
    out = tmp_path_factory.mktemp("store") / "store"
    data = [digits_splits["labeled"], digits_splits["test"]]
    config = CacheConfig(teachers, data, str(out), topk=5, views=3, augment="scale=0.4;1")
    config.device, config.progress = "cpu", False
    run_cache(config)
    return str(out)


def test_distill_from_the_store_end_to_end(store, teachers, digits_splits, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        *["distill", "--store", store, "--student", "timm:test_resnet"],
        *["--train", digits_splits["labeled"], "--unlabeled", digits_splits["test"]],
        *["--out", str(out), "--epochs", "1"],
        *["--batch-size", "64", "--device", "cpu"],
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    stored = json.loads((out / "run.json").read_text())["config"]
    assert stored["store"] == store and stored["teachers"] == []
    info = open_store(store).teachers
    assert summary["teachers"] == [
        {"name": t["name"], "spec": t["spec"], "fingerprint": t["fingerprint"]} for t in info
    ]
    assert [t["spec"] for t in summary["teachers"]] == teachers
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["kd"] > 0 and summary["data"]["unlabeled"]["rows"] == 447
    assert (out / "student").is_dir()


def test_the_producer_serves_the_stored_outputs_of_the_views_it_rebuilt(store, digits_splits):
    train, unlabeled = load_data(digits_splits["labeled"]), load_data(digits_splits["test"])
    producer = store_producer(store, train, unlabeled, train.classes)
    producer.check_rows(597)
    with pytest.raises(UsageError, match="serves 597 rows, distill has 596"):
        producer.check_rows(596)
    opened = open_store(store)
    idx = torch.tensor([3, 596, 149, 150, 500])  # train rows, then unlabeled rows 446, 0, 350
    where = [(0, 3), (1, 446), (0, 149), (1, 0), (1, 350)]
    x = torch.cat([(train if s == 0 else unlabeled).batch([row])[0] for s, row in where])
    out = producer(x, idx)  # before any view is picked: view 0
    for b, (s, row) in enumerate(where):
        expected, _ = opened.read(opened.splits[s], np.array([row]), np.array([0]))
        assert torch.equal(out.logits[:, b], expected[:, 0])
    views = producer.rebuild_views(x, idx, 1)
    picked = producer.view_of(idx.numpy(), 1)
    assert set(picked.tolist()) <= {0, 1, 2} and len(set(picked.tolist())) > 1
    # the views of a row are a fixed function of the seed, the epoch and the row
    assert np.array_equal(picked, producer.view_of(idx.numpy(), 1))
    everything = np.arange(597)
    per_epoch = [producer.view_of(everything, epoch) for epoch in range(3)]
    assert not np.array_equal(per_epoch[0], per_epoch[1])
    assert all(abs(np.bincount(v, minlength=3) / 597 - 1 / 3).max() < 0.08 for v in per_epoch)
    seeded = store_producer(store, train, unlabeled, train.classes, seed=5)
    assert not np.array_equal(seeded.view_of(everything, 1), per_epoch[1])
    assert producer(views, idx).logits.equal(out.logits)  # before set_epoch: view 0
    producer.set_epoch(1)
    out = producer(views, idx)
    probs = out.logits.exp().sum(-1)
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-3)
    for b, (s, row) in enumerate(where):
        split = opened.splits[s]
        rebuilt = opened.view_inputs(split, x[b : b + 1], np.array([row]), picked[b : b + 1])
        assert torch.equal(views[b : b + 1], rebuilt)
        expected, _ = opened.read(split, np.array([row]), picked[b : b + 1])
        assert torch.equal(out.logits[:, b], expected[:, 0])
        assert (picked[b] == 0) == torch.equal(views[b], x[b])


def test_store_options_are_checked(store, digits_splits, tmp_path):
    from kdplug.engines.distill import DistillConfig, distill

    common = dict(student="timm:test_resnet", train=digits_splits["labeled"], out=str(tmp_path))
    for change, message in [
        ({"teachers": ["torchscript:t.pt"]}, "--store replaces --teacher"),
        ({"calibration": "t.json"}, "--store replaces --calibration"),
        ({"augment": "default"}, "--augment would change the inputs"),
    ]:
        with pytest.raises(UsageError, match=message):
            distill(DistillConfig(**{"store": store, **common, **change}))
    train, other = load_data(digits_splits["labeled"]), load_data(digits_splits["unlabeled"])
    with pytest.raises(UsageError, match="expected STORE or STORE,force=true"):
        store_producer(f"{store},tau=1", train, None, train.classes)
    with pytest.raises(UsageError, match=r"holds no split for .*\(1200 rows"):
        store_producer(store, train, other, train.classes)
    with pytest.raises(UsageError, match="store .* holds classes"):
        store_producer(store, train, None, list("abcdefghij"))


def test_the_store_as_a_teacher_source_equals_the_live_teacher(teachers, digits_splits, tmp_path):
    data = digits_splits["labeled"]
    config = CacheConfig(teachers, [data], str(tmp_path / "s"), dtype="float32", device="cpu")
    config.progress = False
    run_cache(config)
    stored = [f"store:{tmp_path / 's'},teacher={k}" for k in range(2)]
    source = load_data(data)
    x, _, idx = source.batch(list(range(len(source))))
    for spec, live in zip(stored, teachers):
        teacher = create("teachers", spec)
        assert teacher.uses_row_index and teacher.num_rows == 150
        expected = torch.log_softmax(create("teachers", live)(x), -1)
        assert torch.allclose(teacher(x, idx), expected, atol=1e-6)

    live_report, store_report = report(teachers, data), report(stored, data)
    for live, cached in zip(live_report["teachers"], store_report["teachers"]):
        assert cached["accuracy"] == live["accuracy"]
        assert cached["nll"] == pytest.approx(live["nll"], abs=1e-5)
    with pytest.raises(UsageError, match="holds 150 rows but the data has 447"):
        report(stored, digits_splits["test"])
    with pytest.raises(UsageError, match=r"teacher must be in 0\.\.1, got 2"):
        create("teachers", f"store:{tmp_path / 's'},teacher=2")

    labeled = run_label(
        LabelConfig(
            teachers=stored,
            data=data,
            out=str(tmp_path / "labels"),
            generator="threshold,tau=0.0",
            device="cpu",
            progress=False,
        )
    )
    assert labeled["rows"] == 150 and labeled["accepted"] == 150


def store_config(store, digits_splits, out, loss):
    """A one-epoch distill config of ``loss`` from the store."""
    from kdplug.engines.distill import DistillConfig

    return DistillConfig(
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        unlabeled=digits_splits["test"],
        store=store,
        loss=loss,
        combiner="mean",
        out=str(out),
        epochs=1,
        batch_size=64,
        workers=0,
    )


def test_a_consistency_loss_reads_the_weak_views_outputs_from_the_store(
    store, digits_splits, tmp_path, register_plugin, monkeypatch
):
    """The weak view is the store's view of each row (its teachers' outputs are stored);
    the strong view is made from the row itself."""
    from kdplug.engines.distill import distill
    from kdplug.store import producer as store_module
    from tests.test_distill_terms import Plugin

    plugin = Plugin()
    loss = plugin.losses["consistent"]
    loss.uses_teachers, loss.kd_weight = True, 0.0  # it reads the teachers' prediction
    register_plugin(plugin, "terms")
    picked = []
    rebuild = store_module.StoreProducer.rebuild_views

    def recording(self, x, idx, epoch):
        picked.append(x.shape)
        return rebuild(self, x, idx, epoch)

    monkeypatch.setattr(store_module.StoreProducer, "rebuild_views", recording)
    distill(store_config(store, digits_splits, tmp_path / "run", "consistent"))
    assert picked and all(shape[1:] == (1, 8, 8) for shape in picked)  # weak views only
    probs = torch.cat([call["probs"] for call in loss.calls])
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))


def test_a_feature_loss_is_refused_with_a_store(store, digits_splits, tmp_path, register_plugin):
    from kdplug.engines.distill import distill
    from tests.test_distill_terms import Plugin

    register_plugin(Plugin(), "terms")
    with pytest.raises(UsageError, match="which a store does not hold"):
        distill(store_config(store, digits_splits, tmp_path / "run", "hint"))
    assert not (tmp_path / "run").exists()


def test_the_loader_workers_rebuild_each_epochs_views(store, digits_splits, tmp_path, monkeypatch):
    """The step gets the views already made (by a loader worker process here), those the
    producer gives each row in that epoch, and the producer serves that epoch's outputs."""
    from kdplug.engines import distill as engine

    seen = []
    step = engine.Trainer.step

    def recording(self, x, y, idx):
        seen.append((x.clone(), idx.clone(), self.producer.epoch))
        return step(self, x, y, idx)

    monkeypatch.setattr(engine.Trainer, "step", recording)
    config = store_config(store, digits_splits, tmp_path / "run", "kd")
    config.workers, config.epochs, config.seed = 1, 2, 3
    engine.distill(config)
    assert {epoch for _, _, epoch in seen} == {0, 1}
    train, unlabeled = load_data(digits_splits["labeled"]), load_data(digits_splits["test"])
    producer = store_producer(store, train, unlabeled, train.classes, seed=3)
    rows = engine.TrainRows(train, unlabeled)
    for x, idx, epoch in seen[:2] + seen[-2:]:
        plain = rows.batch(idx.tolist())[0]
        assert not torch.equal(x, plain)  # views other than view 0 were rebuilt
        torch.testing.assert_close(x, producer.rebuild_views(plain, idx, epoch))
