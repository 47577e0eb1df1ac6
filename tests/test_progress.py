"""Progress like timm's train.py (issue 19, point 8): loss, lr and samples/s in the bar on a
terminal; without one, no carriage-return bar but a log line every N steps."""

import re

import pytest

from tests.conftest import run_cli

NUMBER = r"[0-9.e+-]+"


@pytest.fixture(scope="module")
def logistic_teacher(digits_splits, tmp_path_factory):
    import skops.io

    from tests.teacher_fixtures import fit_logistic

    path = tmp_path_factory.mktemp("progress-teacher") / "logreg.skops"
    skops.io.dump(fit_logistic(digits_splits["labeled"]), path)
    return f"sklearn:{path}"


def test_distill_without_a_terminal_logs_loss_lr_and_speed_every_n_steps(digits_splits, tmp_path):
    args = ["distill", "--student", "timm:test_resnet", "--train", digits_splits["labeled"]]
    args += ["--loss", "ce", "--epochs", "2", "--batch-size", "10", "--device", "cpu"]
    args += ["--log-interval", "5", "--out", str(tmp_path / "run")]
    result = run_cli(*args)  # stderr is a pipe, not a terminal
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    # 150 rows / 10 = 15 steps per epoch: a line at steps 5, 10 and 15 of each epoch
    step = rf"epoch (\d)/2: step (\d+)/15, loss {NUMBER}, lr {NUMBER}, {NUMBER} samples/s"
    seen = re.findall(step, result.stderr)
    assert seen == [(e, s) for e in "12" for s in ("5", "10", "15")], result.stderr
    epoch = rf"epoch (\d): loss {NUMBER}, lr {NUMBER}, val accuracy -, {NUMBER} samples/s"
    assert re.findall(epoch, result.stderr) == ["1", "2"]


def test_label_without_a_terminal_logs_lines_not_bars(digits_splits, logistic_teacher, tmp_path):
    args = ["label", "--teacher", logistic_teacher, "--data", digits_splits["unlabeled"]]
    args += ["--batch-size", "20", "--device", "cpu", "--out", str(tmp_path / "labels")]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    # 1200 rows / 20 = 60 batches: a line at batch 50 (the default interval), one at the end
    assert re.search(rf"label: batch 50/60, {NUMBER} samples/s\n", result.stderr)
    assert re.search(rf"label: batch 60/60, {NUMBER} samples/s, done in", result.stderr)


def test_on_a_terminal_the_bar_shows_loss_lr_and_samples_per_s(
    digits_splits, tmp_path, monkeypatch, capsys
):
    from kdplug.engines.distill import DistillConfig, distill

    monkeypatch.setattr("kdplug.progress.on_terminal", lambda: True)
    config = DistillConfig(
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        out=str(tmp_path / "run"),
        loss="ce",
        epochs=1,
        batch_size=50,
        log_interval=1,
        device="cpu",
    )
    distill(config)
    bar = capsys.readouterr().err.split("\r")[-1]  # the bar as it was left
    assert re.search(rf"epoch 1/1: 100%.*3/3 .*loss={NUMBER}, lr={NUMBER}, samples/s=", bar), bar


def test_progress_asks_for_its_numbers_only_when_a_line_is_due(monkeypatch, caplog):
    """A loop's numbers (a GPU loss: a wait for the device) are read once per interval."""
    from kdplug.progress import Progress

    monkeypatch.setattr("kdplug.progress.on_terminal", lambda: False)
    asked = []
    caplog.set_level("INFO", logger="kdplug.progress")
    with Progress("loop", 10, every=4, unit="step") as progress:
        for _ in range(10):
            progress.update(rows=8, values=lambda: asked.append(1) or {"loss": 0.5})
    assert len(asked) == 2  # steps 4 and 8
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("loop: step 4/10, loss 0.5, ")
    assert lines[-1].startswith("loop: step 10/10, loss 0.5, ") and "done in" in lines[-1]


def test_cache_without_a_terminal_logs_lines_not_bars(
    digits_splits, logistic_teacher, tmp_path, caplog
):
    from click.testing import CliRunner

    from kdplug.cli import build_cli

    caplog.set_level("INFO", logger="kdplug.progress")
    args = ["cache", "--teacher", logistic_teacher, "--data", digits_splits["labeled"]]
    args += ["--batch-size", "10", "--device", "cpu", "--out", str(tmp_path / "store")]
    result = CliRunner().invoke(build_cli(), args)  # its stderr is no terminal
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    lines = [r.getMessage() for r in caplog.records if r.name == "kdplug.progress"]
    assert lines and re.fullmatch(
        rf"cache: batch 15/15, {NUMBER} samples/s, done in .* s", lines[-1]
    )
