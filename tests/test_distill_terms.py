"""distill's extra terms through the contract: a consistency loss (``strong_augment``, weak
and strong views, μ-ratio batches) and a feature loss (``feature_stages``, a projector),
with losses and a teacher written here as a third-party plugin would write them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdplug
from kdplug.consistency_data import PlainView, RatioOrder, TwoViews
from kdplug.data import decode_image
from kdplug.engines.distill import DistillConfig, distill
from kdplug.errors import UsageError


class Consistency:
    """A FixMatch-like loss: CE of the strong views against the weak views' argmax (every
    row counts); it records what the engine hands it."""

    uses_teachers = False
    temperature = 1.0
    standardize = False
    ce_weight = 1.0
    kd_weight = 0.0
    strong_augment = {"auto_augment": "rand-m9-n2"}
    unlabeled_ratio = 3.0

    def __init__(self):
        self.calls: list[dict] = []
        self.stop_at = None  # fail on this call (1-based), as a stopped run
        self.rows = None
        self.seen = torch.zeros(0, dtype=torch.long)

    def set_unlabeled_rows(self, rows):
        self.rows = rows
        self.seen = torch.zeros(rows, dtype=torch.long)

    def consistency(self, weak_logits, strong_logits, teacher_probs, rows):
        self.calls.append(
            dict(
                weak=weak_logits.detach().clone(),
                strong=strong_logits.detach().clone(),
                probs=teacher_probs,
                rows=rows.clone(),
                weak_grad=weak_logits.requires_grad,
            )
        )
        self.seen += torch.bincount(rows.cpu(), minlength=len(self.seen))
        if len(self.calls) == self.stop_at:
            raise RuntimeError("stopped")
        target = weak_logits.argmax(-1)
        return torch.nn.functional.cross_entropy(strong_logits, target)

    def state_dict(self):
        return {"seen": self.seen.clone()}

    def load_state_dict(self, state):
        self.seen = state["seen"].clone()

    def __call__(self, student_logits, target, labels):
        return student_logits.new_zeros(())


class Net(torch.nn.Module):
    """A two-stage CNN teacher on [0, 1] digits, with ``intermediates``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stage1 = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU())
        self.stage2 = torch.nn.Sequential(torch.nn.Conv2d(6, 12, 3, 2, 1), torch.nn.ReLU())
        self.head = torch.nn.Linear(12, 10)
        self.stages_asked: list[list[int]] = []

    def intermediates(self, x, stages):
        self.stages_asked.append(list(stages))
        first = self.stage1(x)
        second = self.stage2(first)
        features = [first, second]
        return self.head(second.mean((2, 3))), [features[i] for i in stages]

    def forward(self, x):
        return self.intermediates(x, [0])[0]


class Hint:
    """A FitNets-like loss on the last stage: MSE between a 1x1 projection of the student's
    feature map (resized to the teacher's) and the teacher's."""

    uses_teachers = True
    temperature = 1.0
    standardize = False
    ce_weight = 1.0
    kd_weight = 0.0
    feature_stages = [-1]
    feature_teacher = None

    def __init__(self):
        self.shapes = None

    def build_projector(self, student_shapes, teacher_shapes):
        self.shapes = (student_shapes, teacher_shapes)
        (cs, _, _), (ct, ht, wt) = student_shapes[0], teacher_shapes[0]
        return torch.nn.Sequential(torch.nn.Conv2d(cs, ct, 1), torch.nn.AdaptiveAvgPool2d((ht, wt)))

    def feature_loss(self, projector, student_features, teacher_features):
        return torch.nn.functional.mse_loss(projector(student_features[0]), teacher_features[0])

    def __call__(self, student_logits, target, labels):
        return student_logits.new_zeros(())


NET = Net()


class Plugin:
    def __init__(self):
        self.losses = {"consistent": Consistency(), "hint": Hint()}

    @kdplug.hookimpl
    def register_losses(self, register):
        for name, loss in self.losses.items():
            register(name, lambda loss=loss: loss)

    @kdplug.hookimpl
    def register_teachers(self, register):
        register("net", lambda ref: NET)
        register(
            "flat", lambda ref: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        )


@pytest.fixture
def plugin(register_plugin):
    found = Plugin()
    register_plugin(found, "terms")
    return found


def config(digits_splits, out, **options) -> DistillConfig:
    values = dict(
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        unlabeled=digits_splits["labeled"],  # its labels unread: 150 unlabeled rows
        out=str(out),
        epochs=1,
        batch_size=32,
        workers=0,
    )
    return DistillConfig(**{**values, **options})


def test_a_consistency_loss_gets_weak_and_strong_views_of_the_unlabeled_rows(
    digits_splits, tmp_path, plugin
):
    loss = plugin.losses["consistent"]
    summary = distill(config(digits_splits, tmp_path / "run", loss="consistent", epochs=2))
    assert loss.rows == 150  # set_unlabeled_rows: the --unlabeled rows
    # mu 3 on batches of 32: 8 labeled and 24 unlabeled rows a step, 150 // 24 = 6 steps
    assert len(loss.calls) == 2 * 6
    assert all(len(call["rows"]) == 24 for call in loss.calls)
    assert not any(call["weak_grad"] for call in loss.calls)  # weak views: no gradient
    assert all(call["probs"] is None for call in loss.calls)  # no teachers
    assert all(not torch.equal(call["weak"], call["strong"]) for call in loss.calls)
    epoch = torch.cat([call["rows"] for call in loss.calls[:6]])
    assert len(set(epoch.tolist())) == len(epoch) == 6 * 24  # each row once an epoch
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all('"consistency": ' in line for line in lines)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(state["trainer"]["loss"]["seen"], loss.seen)
    assert summary["epochs"] == 2


def test_a_consistency_loss_state_is_restored_on_resume(digits_splits, tmp_path, plugin):
    loss = plugin.losses["consistent"]
    out = tmp_path / "run"
    loss.stop_at = 7  # the first step of epoch 2 fails: the checkpoint is epoch 1's
    with pytest.raises(kdplug.PluginError, match="stopped"):
        distill(config(digits_splits, out, loss="consistent", epochs=2))
    after_one = loss.seen.clone()
    loss.seen, loss.stop_at = torch.zeros_like(after_one), None
    distill(config(digits_splits, out, loss="consistent", epochs=2, resume=True))
    assert int(after_one.sum()) == 6 * 24 + 24  # epoch 1, and the failed step's rows
    assert int(loss.seen.sum()) == 2 * 6 * 24  # restored epoch 1's counts, then epoch 2


def test_a_consistency_loss_is_refused_on_tabular_rows_and_with_mixup(
    digits_splits, tmp_path, plugin
):
    with pytest.raises(UsageError, match="mixup or cutmix"):
        distill(config(digits_splits, tmp_path / "a", loss="consistent", augment="mixup=0.2"))
    with pytest.raises(UsageError, match="is tabular"):
        distill(
            config(
                digits_splits,
                tmp_path / "b",
                loss="consistent",
                student="tabular:mlp",
                train="sklearn:iris",
                unlabeled=None,
            )
        )


def test_a_consistency_loss_without_unlabeled_rows_is_refused_first(
    digits_splits, tmp_path, plugin
):
    with pytest.raises(UsageError, match="--loss consistent learns from unlabeled rows"):
        distill(config(digits_splits, tmp_path / "run", loss="consistent", unlabeled=None))
    assert plugin.losses["consistent"].rows is None  # refused before the trainer is built
    assert not (tmp_path / "run").exists()


def test_two_views_stack_the_weak_and_the_strong_view():
    from PIL import Image

    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    views = TwoViews((1, 16, 16), None, {"auto_augment": "rand-m9-n3"})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pair = views(image)
    assert pair.shape == (2, 1, 16, 16) and pair.dtype == np.float32
    # no --augment: the weak view is the data path's own decode (resized to image_size)
    plain = decode_image(image, (1, 16, 16), 0, resize=True)
    np.testing.assert_array_equal(pair[0], plain)
    np.testing.assert_array_equal(PlainView((1, 16, 16))(image), plain)
    assert 0 <= pair.min() and pair.max() <= 1
    assert not np.allclose(pair[0], pair[1])


def test_ratio_order_fills_every_batch_alike_and_shares_the_unlabeled_rows(monkeypatch):
    from kdplug import distributed

    labels = np.array([0, 1, 2, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1])  # 4 labeled
    order = RatioOrder(labels, batch_size=4, ratio=3.0, seed=1)
    assert (order.labeled_per_batch, order.unlabeled_per_batch, order.steps) == (1, 3, 3)
    assert order(0).dtype == np.int64
    rows = order(0).reshape(order.steps, 4)
    assert (labels[rows[:, 0]] >= 0).all() and (labels[rows[:, 1:]] < 0).all()
    assert len(set(rows[:, 1:].ravel().tolist())) == 9
    assert np.array_equal(order(0), order(0)) and not np.array_equal(order(0), order(1))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shared = RatioOrder(labels, batch_size=4, ratio=3.0, seed=1)
        shares.append(np.array(shared(0)).reshape(shared.steps, 4)[:, 1:].ravel())
    assert not set(shares[0]) & set(shares[1])
    with pytest.raises(UsageError, match="has none"):
        RatioOrder(np.array([0, 1]), 4, 3.0, 0)


def test_a_feature_loss_trains_a_projector_kept_in_the_checkpoint_only(
    digits_splits, tmp_path, plugin
):
    loss = plugin.losses["hint"]
    out = tmp_path / "run"
    NET.stages_asked.clear()
    distill(config(digits_splits, out, loss="hint", teachers=["net:x"], combiner="mean"))
    # test_resnet's last stage on 8x8 digits and the teacher's second stage
    assert loss.shapes[1] == [(12, 4, 4)]
    assert (-1,) in set(map(tuple, NET.stages_asked))  # (0,): its plain forward, checked
    state = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]
    projector = state["projector"]
    assert set(projector) == {"0.weight", "0.bias"}
    assert projector["0.weight"].shape[:2] == (12, loss.shapes[0][0][0])
    from safetensors.torch import load_file

    student = load_file(out / "student" / "model.safetensors")
    assert not any(key.startswith(("projector", "model.")) for key in student)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert '"features": ' in lines[-1]


def test_a_feature_loss_is_refused_without_teacher_features(digits_splits, tmp_path, plugin):
    with pytest.raises(UsageError, match="offers intermediate features"):
        distill(
            config(
                digits_splits,
                tmp_path / "run",
                loss="hint",
                teachers=["flat:x"],
                combiner="mean",
            )
        )


def test_a_stage_the_student_lacks_is_one_line(digits_splits, tmp_path, plugin):
    plugin.losses["hint"].feature_stages = [9]  # test_resnet has 5 (stem and 4 stages)
    with pytest.raises(UsageError, match=r"the student has no feature stages \[9\]") as error:
        distill(
            config(
                digits_splits, tmp_path / "run", loss="hint", teachers=["net:x"], combiner="mean"
            )
        )
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
