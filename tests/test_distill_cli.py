"""``kdplug distill``: config file + flags, outputs and bad input (in this process), kill -9 +
resume (real subprocesses)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdplug.engines.distill import DistillConfig, distill
from kdplug.teacher_names import teacher_names
from tests.conftest import invoke_cli, run_cli

STUDENT = "timm:test_resnet"
TIMED = ("samples_per_s", "epoch_time_s")


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teachers(digits_splits, tmp_path_factory):
    """A kdplug student (1 epoch on the labeled rows) and a logistic regression (skops)."""
    import skops.io
    from sklearn.linear_model import LogisticRegression

    from kdplug.data import load_data

    root = tmp_path_factory.mktemp("cli-teachers")
    distill(
        DistillConfig(
            student=STUDENT,
            train=digits_splits["labeled"],
            out=str(root / "cnn"),
            loss="ce",
            epochs=1,
            batch_size=50,
        )
    )
    source = load_data(digits_splits["labeled"])
    x, y, _ = source.batch(list(range(len(source))))
    skops.io.dump(LogisticRegression(max_iter=200).fit(x.flatten(1), y), root / "lr.skops")
    # a kdplug teacher's fingerprint is the hash of its student directory
    return {
        "paths": [root / "cnn" / "student", root / "lr.skops"],
        "specs": [f"kdplug:{root / 'cnn'}", f"sklearn:{root / 'lr.skops'}"],
    }


def test_config_file_with_flag_overrides_writes_a_complete_run(digits_splits, teachers, tmp_path):
    import timm
    import yaml

    from kdplug.data import load_data
    from kdplug.file_hashes import file_hash

    config = {
        "teacher": teachers["specs"],
        "student": STUDENT,
        "train": digits_splits["labeled"],
        "unlabeled": digits_splits["test"],
        "val": digits_splits["test"],
        "epochs": 5,
        "batch-size": 64,
        "loss": "kd,T=2",
        "combiner": "entropy",
        "ema": True,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    args = ["distill", "--config", tmp_path / "run.yaml", "--epochs", "2", "--seed", "3"]
    result = invoke_cli(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"student written to {out / 'student'}" in result.stdout

    recorded = json.loads((out / "run.json").read_text())["config"]
    assert recorded["epochs"] == 2 and recorded["seed"] == 3  # flags win
    assert recorded["combiner"] == "entropy" and recorded["batch_size"] == 64  # from the file
    assert recorded["loss"] == "kd,T=2" and recorded["ema"] is True

    lines = _lines(out)
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        assert set(line["teacher_weights"]) == set(teacher_names(teachers["specs"]))
        assert sum(line["teacher_weights"].values()) == pytest.approx(1.0)
        assert line["samples_per_s"] > 0 and 0 <= line["val_accuracy"] <= 1

    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and len(summary["epoch_times_s"]) == 2
    assert summary["best_val_accuracy"] == max(line["val_accuracy"] for line in lines)
    assert summary["peak_memory"]["bytes"] > 0
    assert [t["fingerprint"] for t in summary["teachers"]] == [
        file_hash(path) for path in teachers["paths"]
    ]
    assert summary["data"]["unlabeled"]["rows"] == 447 and summary["data"]["train"]["fingerprint"]
    assert {"kdplug", "torch", "timm", "plugin:timm"} <= set(summary["versions"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["epoch"] == 2

    # the kept student, loaded by timm alone (its hub format) with the documented
    # preprocessing, scores the best val accuracy the run measured
    model = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True)
    student = model.pretrained_cfg
    test = load_data(digits_splits["test"])
    x, y, _ = test.batch(list(range(len(test))))
    assert list(x.shape[1:]) == list(student["input_size"])
    mean = torch.tensor(student["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(student["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        predicted = model.eval()((x - mean) / std).argmax(1)
    accuracy = (predicted == y).float().mean().item()
    assert accuracy == pytest.approx(summary["best_val_accuracy"], abs=1.5 / len(test))


def test_distill_resumes_after_kill_9_like_an_uninterrupted_run(digits_splits, tmp_path):
    from kdplug.model_dir import load_classifier

    flags = {
        "loss": "ce",
        "student": STUDENT,
        "train": digits_splits["test"],
        "epochs": 3,
        "batch-size": 32,
        "lr": 0.003,
    }
    args = ["distill", *[a for k, v in flags.items() for a in (f"--{k}", str(v))]]
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "kdplug", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert len(_lines(out)) < 3 and not (out / "summary.json").exists()

    resumed = run_cli(*args, "--out", str(out), "--resume", check=True)
    assert "resuming" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 3

    whole = tmp_path / "whole"
    distill(DistillConfig.from_mapping({**flags, "out": str(whole)}))
    strip = [{k: v for k, v in line.items() if k not in TIMED} for line in _lines(out)]
    assert strip == [{k: v for k, v in line.items() if k not in TIMED} for line in _lines(whole)]
    # the resumed student is the uninterrupted run's, and loads as a classifier
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(
            load_classifier(out / "student")(x), load_classifier(whole / "student")(x)
        )


def test_bad_input_is_one_line_exit_2_and_nothing_written(digits_splits, tmp_path):
    # every other bad input takes the same path (UsageError); test_distill.py checks them
    out = tmp_path / "out"
    result = invoke_cli(
        "distill", "--student", STUDENT, "--train", digits_splits["labeled"], "--teacher",
        "kdplug:nowhere", "--out", out, "--loss", "kdd",
    )  # fmt: skip
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("Error: unknown loss 'kdd'; did you mean 'kd'?")
    assert "Traceback" not in result.stderr
    assert not out.exists()
