"""distill's optimizer and schedule options, built by timm's factories (issue 19, point 4)."""

import json

import pytest
import torch
import torch.nn.functional as F

from kdplug import UsageError
from kdplug.engines.distill import (
    DistillConfig,
    Trainer,
    TrainRows,
    build_optimizer,
    build_parts,
    build_scheduler,
    distill,
)

STUDENT = "timm:test_resnet"


def _config(digits_splits, tmp_path, **values) -> DistillConfig:
    settings = dict(
        student=STUDENT,
        train=digits_splits["labeled"],
        out=str(tmp_path / "run"),
        loss="ce",
        epochs=3,
        batch_size=50,
        device="cpu",
    )
    return DistillConfig(**{**settings, **values})


def _lrs(optimizer, scheduler, updates: int) -> list[list[float]]:
    """Every param group's lr after each of ``updates`` per-update steps."""
    seen = []
    for step in range(1, updates + 1):
        scheduler.step_update(num_updates=step)
        seen.append([group["lr"] for group in optimizer.param_groups])
    return seen


def test_the_defaults_are_the_adamw_and_cosine_kdplug_always_used():
    """The hard-coded optimizer and schedule of before: AdamW (weight decay 0.05) and a
    per-update cosine to 0; the defaults give the same groups and learning rates."""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    config = DistillConfig(student=STUDENT, train="t", out="o", epochs=4, lr=3e-3)
    config.validate()
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    before = create_optimizer_v2(model, opt="adamw", lr=3e-3, weight_decay=0.05)
    before_sched, _ = create_scheduler_v2(
        before, sched="cosine", num_epochs=4, step_on_epochs=False, updates_per_epoch=7
    )
    now = build_optimizer(model, config)
    now_sched = build_scheduler(now, config, 7)
    assert type(now) is type(before) and now.defaults == before.defaults
    assert [g["weight_decay"] for g in now.param_groups] == [
        g["weight_decay"] for g in before.param_groups
    ]
    assert _lrs(now, now_sched, 28) == _lrs(before, before_sched, 28)


def test_the_cli_flags_are_the_options_self_train_passes_on():
    """kdplug.cli.training's flags (imported without torch) name exactly distill.TRAINING,
    the options self-train checks and hands to every round."""
    from kdplug.cli.training import NAMES
    from kdplug.engines.distill import TRAINING, DistillConfig

    assert NAMES == TRAINING
    assert set(TRAINING) <= set(DistillConfig.__dataclass_fields__)


def test_timm_options_reach_the_factories_and_the_run_follows_them(digits_splits, tmp_path):
    options = dict(
        opt="sgd",
        momentum=0.8,
        weight_decay=0.0,
        lr=0.2,
        sched="step",
        decay_epochs=1,
        decay_rate=0.5,
        warmup_epochs=1,
        warmup_lr=0.01,
    )
    config = _config(digits_splits, tmp_path, **options)
    distill(config)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 150 rows / 50 = 3 updates per epoch; each epoch's line has the lr after its last update
    from timm.scheduler import create_scheduler_v2

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    expected, _ = create_scheduler_v2(
        probe,
        sched="step",
        num_epochs=3,
        decay_epochs=1,
        decay_rate=0.5,
        warmup_epochs=1,
        warmup_lr=0.01,
        step_on_epochs=False,
        updates_per_epoch=3,
    )
    lrs = [lr for (lr,) in _lrs(probe, expected, 9)]
    assert [line["lr"] for line in lines] == pytest.approx([lrs[2], lrs[5], lrs[8]])
    assert lrs[2] != lrs[8]  # the schedule does move
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    optimizer = state["trainer"]["optimizer"]
    assert optimizer["param_groups"][0]["momentum"] == 0.8  # SGD's own key
    assert all("momentum_buffer" in s for s in optimizer["state"].values())
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert {k: recorded[k] for k in options} == options
    with pytest.raises(UsageError, match="different configuration"):
        distill(_config(digits_splits, tmp_path, **{**options, "decay_rate": 0.3}, resume=True))


def test_multistep_decays_at_the_milestones_as_timms_scheduler():
    """--sched multistep --decay-milestones 1,3: timm's MultiStepLRScheduler, stepped per
    update (7 an epoch), x0.5 at the end of epoch 1 and of epoch 3."""
    import timm
    from timm.scheduler import create_scheduler_v2

    config = DistillConfig(
        student=STUDENT, train="t", out="o", epochs=4, lr=0.1, opt="sgd", sched="multistep"
    )
    config.decay_milestones, config.decay_rate = "1,3", 0.5  # as the CLI gives it
    config.validate()
    assert config.decay_milestones == [1.0, 3.0]
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    now = build_optimizer(model, config)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    expected, _ = create_scheduler_v2(
        probe,
        sched="multistep",
        num_epochs=4,
        decay_milestones=[1, 3],
        decay_rate=0.5,
        step_on_epochs=False,
        updates_per_epoch=7,
    )
    got = [lr for lr, *_ in _lrs(now, build_scheduler(now, config, 7), 28)]
    assert got == pytest.approx([lr for (lr,) in _lrs(probe, expected, 28)])
    # timm decays when the next update reaches the milestone (updates 7 and 21)
    assert got == pytest.approx([0.1] * 5 + [0.05] * 14 + [0.025] * 9)
    for bad in ("3,1", "0,2", "a", []):
        config.decay_milestones = bad
        with pytest.raises(UsageError, match="decay-milestones must be increasing epochs"):
            config.validate()


def _trainer(digits_splits, tmp_path, **values):
    config = _config(digits_splits, tmp_path, **values)
    config.validate()
    parts = build_parts(config)
    trainer = Trainer(parts, config, torch.device("cpu"), updates_per_epoch=3)
    x, y, idx = TrainRows(parts.train, None).batch(list(range(50)))
    return trainer, x, y, idx


def test_label_smoothing_smooths_the_cross_entropy_on_labels(digits_splits, tmp_path):
    trainer, x, y, idx = _trainer(digits_splits, tmp_path, label_smoothing=0.3)
    trainer.begin_epoch(0, 3)
    with torch.no_grad():
        logits = trainer.model(trainer.normalize(x)).float()
    expected = F.cross_entropy(logits, y, label_smoothing=0.3)
    assert not torch.isclose(expected, F.cross_entropy(logits, y))
    stats = trainer.step(x, y, idx)
    assert float(stats["ce"]) / stats["rows"] == pytest.approx(float(expected), rel=1e-4)


def test_clip_grad_bounds_the_update_by_the_clipped_norm(digits_splits, tmp_path):
    sgd = dict(opt="momentum", lr=1.0, momentum=0.0, weight_decay=0.0, sched="constant")
    moved = {}
    for clip in (None, 1e-3):
        trainer, x, y, idx = _trainer(digits_splits, tmp_path, clip_grad=clip, **sgd)
        trainer.begin_epoch(0, 3)
        torch.manual_seed(0)
        start = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.step(x, y, idx)
        delta = [p.detach() - s for p, s in zip(trainer.model.parameters(), start)]
        moved[clip] = float(torch.linalg.vector_norm(torch.stack([d.norm() for d in delta])))
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3)  # lr 1: the step is the clipped grad
    assert moved[None] > 0.01


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"opt": "adamx"}, r"unknown opt 'adamx' \(did you mean 'adamax'\?"),
        ({"sched": "plateau"}, r"unknown sched 'plateau' .*known: cosine, tanh, step"),
        ({"clip_mode": "max"}, r"unknown clip-mode 'max'"),
        ({"label_smoothing": 1.0}, r"label-smoothing must be < 1"),
        ({"weight_decay": -1}, r"weight-decay must be >= 0"),
        ({"clip_grad": 0}, r"clip-grad must be > 0"),
        ({"warmup_epochs": 3, "epochs": 3}, r"warmup-epochs \(3\) must be fewer than epochs \(3\)"),
        ({"log_interval": 0}, r"log-interval must be an integer >= 1"),
    ],
)
def test_bad_training_options_are_one_line_usage_errors(values, message):
    with pytest.raises(UsageError, match=message):
        DistillConfig.from_mapping({"student": "s", "train": "t", "out": "o", **values})


def test_config_file_and_flags_set_the_training_options(digits_splits, tmp_path):
    from click.testing import CliRunner

    from kdplug.cli import build_cli

    config = tmp_path / "train.yaml"
    config.write_text("opt: SGD\nweight-decay: '1e-4'\nsched: constant\nclip_grad: 2\n")
    out = tmp_path / "cli"
    args = ["distill", "--config", str(config), "--student", STUDENT, "--loss", "ce"]
    args += ["--train", digits_splits["labeled"], "--out", str(out), "--epochs", "1"]
    args += ["--batch-size", "50", "--device", "cpu", "--label-smoothing", "0.1"]
    result = CliRunner().invoke(build_cli(), args)
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "run.json").read_text())["config"]
    assert (recorded["opt"], recorded["sched"], recorded["clip_grad"]) == ("sgd", "constant", 2.0)
    assert (recorded["weight_decay"], recorded["label_smoothing"]) == (1e-4, 0.1)


@pytest.fixture(scope="module")
def logistic_teacher(digits_splits, tmp_path_factory):
    import skops.io

    from tests.teacher_fixtures import fit_logistic

    path = tmp_path_factory.mktemp("training-teacher") / "logreg.skops"
    skops.io.dump(fit_logistic(digits_splits["labeled"]), path)
    return f"sklearn:{path}"


def _self_train(digits_splits, teacher, out, *options):
    from click.testing import CliRunner

    from kdplug.cli import build_cli

    args = ["self-train", "--teacher", teacher, "--student", STUDENT, "--out", str(out)]
    args += ["--train", digits_splits["labeled"], "--unlabeled", digits_splits["unlabeled"]]
    args += ["--val", digits_splits["test"], "--rounds", "1", "--epochs", "2", "--device", "cpu"]
    args += ["--generator", "threshold,tau=0.5", *options]
    return CliRunner().invoke(build_cli(), args)


def test_self_train_hands_the_training_options_to_every_distill(
    digits_splits, logistic_teacher, tmp_path
):
    out = tmp_path / "self"
    options = ["--opt", "sgd", "--sched", "step", "--decay-epochs", "1", "--label-smoothing", "0.1"]
    result = _self_train(digits_splits, logistic_teacher, out, *options)
    assert result.exit_code == 0, result.output
    for run in (out / "baseline", out / "round-1" / "distill"):
        recorded = json.loads((run / "run.json").read_text())["config"]
        assert (recorded["opt"], recorded["sched"], recorded["decay_epochs"]) == ("sgd", "step", 1)
        assert recorded["label_smoothing"] == 0.1 and recorded["weight_decay"] == 0.05


def test_self_train_refuses_a_bad_training_option_before_any_work(
    digits_splits, logistic_teacher, tmp_path
):
    out = tmp_path / "self"
    result = _self_train(digits_splits, logistic_teacher, out, "--opt", "adamx")
    assert result.exit_code == 2
    assert "self-train: unknown opt 'adamx' (did you mean 'adamax'?" in result.output
    assert not out.exists()


def test_an_optimizer_timm_cannot_create_here_is_one_line(digits_splits, tmp_path):
    with pytest.raises(UsageError, match=r"^--opt bnbadam: timm could not create it \(.+\)$"):
        _trainer(digits_splits, tmp_path, opt="bnbadam")


def test_a_resumed_run_follows_the_same_schedule_as_an_uninterrupted_one(
    digits_splits, tmp_path, monkeypatch
):
    """The scheduler and the update count are in checkpoint.pt: a run stopped after epoch 1
    (its second checkpoint cannot be written) resumes on the same warm-up and steps."""
    import errno

    options = dict(opt="momentum", lr=0.1, sched="step", decay_epochs=1, warmup_epochs=1)
    whole = tmp_path / "whole"
    distill(_config(digits_splits, tmp_path, out=str(whole), **options))
    out = tmp_path / "cut"
    real_save, calls = torch.save, []

    def fills_up(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(UsageError, match="disk is full"):
        distill(_config(digits_splits, tmp_path, out=str(out), **options))
    monkeypatch.setattr(torch, "save", real_save)
    distill(_config(digits_splits, tmp_path, out=str(out), resume=True, **options))

    def lines(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert [x["lr"] for x in lines(out)] == [x["lr"] for x in lines(whole)]
    assert [x["loss"] for x in lines(out)] == pytest.approx([x["loss"] for x in lines(whole)])
