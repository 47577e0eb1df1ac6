"""`kdplug distill` in 2 processes (DistributedDataParallel, gloo, real subprocesses): one
student, the accuracy of a 1-process run, and a checkpoint that resumes in 1 process."""

import json
import time

import pytest
import torch

from kdplug.data import load_data
from kdplug.model_dir import load_classifier
from tests.conftest import run_cli
from tests.distributed_launch import kill_all, start_torchrun

TIMEOUT = 240


@pytest.fixture(scope="module")
def teacher(digits_splits, tmp_path_factory) -> str:
    """A linear classifier fitted on the unlabeled split (about 98% train accuracy)."""
    source = load_data(digits_splits["unlabeled"])
    x, y, _ = source.batch(list(range(len(source))))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.jit.save(torch.jit.script(net.eval()), path)
    return f"torchscript:{path},allow_code=true"


def distill_args(teacher: str, digits_splits: dict, out, epochs: int) -> list[str]:
    return [
        *["distill", "--student", "timm:test_resnet", "--teacher", teacher],
        *["--combiner", "mean", "--train", digits_splits["test"]],
        *["--val", digits_splits["unlabeled"], "--epochs", str(epochs), "--lr", "0.005"],
        *["--device", "cpu", "--out", str(out)],
    ]


def test_two_processes_match_one_process_accuracy(teacher, digits_splits, tmp_path):
    # the same global batch: 32 rows in one process, 16 rows on each of 2
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(*distill_args(teacher, digits_splits, one, 8), "--batch-size", "32", check=True)
    args = distill_args(teacher, digits_splits, two, 8)
    result = run_cli(
        *args, "--batch-size", "16", "--nproc-per-node", "2", check=True, timeout=TIMEOUT
    )
    assert result.stdout.count("student written to") == 1  # only rank 0 reports
    expected = json.loads((one / "summary.json").read_text())
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert abs(summary["best_val_accuracy"] - expected["best_val_accuracy"]) <= 0.02
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 8
    # the rows counted are both ranks' (2 x 224 of 447 rows), not rank 0's alone
    line = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
    assert line["samples_per_s"] * line["epoch_time_s"] > 0.9 * 448
    student = load_classifier(two / "student")
    assert student(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_two_process_checkpoint_resumes_in_one_process(teacher, digits_splits, tmp_path):
    out = tmp_path / "killed"
    args = [*distill_args(teacher, digits_splits, out, 3), "--batch-size", "16"]
    process = start_torchrun(args)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (metrics.exists() and metrics.read_text().strip()):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no epoch ended in time"
            time.sleep(0.01)
    finally:
        killed = kill_all(process)
    assert len(killed) >= 3  # the launcher and both ranks
    assert not (out / "summary.json").exists()
    first = metrics.read_text().splitlines()[0]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state["trainer"]["model"])

    resumed = run_cli(*args, "--resume", check=True, timeout=TIMEOUT)
    assert "resuming" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 3
    lines = metrics.read_text().splitlines()
    assert len(lines) == 3 and lines[0] == first


def test_a_rank_whose_whole_batch_is_dropped_keeps_in_step(digits_splits, tmp_path):
    """--skip-bad-rows under DDP: a rank left with no row still joins the gradient
    all-reduce, so the other rank's step does not wait forever."""
    import numpy as np

    rows = len(load_data(digits_splits["test"]))
    logits = np.random.default_rng(0).normal(size=(rows, 10)).astype(np.float32)
    logits[np.random.default_rng(1).random(rows) < 0.8] = np.nan  # most batches lose rows
    np.save(tmp_path / "logits.npy", logits)
    out = tmp_path / "run"
    result = run_cli(
        *["distill", "--student", "timm:test_resnet", "--teacher", f"logits:{tmp_path}/logits.npy"],
        *["--combiner", "mean", "--train", digits_splits["test"], "--skip-bad-rows"],
        *["--epochs", "1", "--batch-size", "2", "--device", "cpu", "--out", str(out)],
        *["--nproc-per-node", "2"],
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["bad_rows"] > 0.7 * rows


def test_two_processes_fit_auto_as_one_process_does(teacher, digits_splits, tmp_path):
    """Each rank runs the teachers on its share of the fit rows and every rank fits all of
    them, in one process's order: the fit is the one-process fit (and the same on every
    rank, so every rank's targets agree)."""
    fits = {}
    for name, extra in (("one", []), ("two", ["--nproc-per-node", "2"])):
        args = distill_args(teacher, digits_splits, tmp_path / name, 1)
        args[args.index("mean")] = "auto"
        extra += ["--calibration-data", digits_splits["labeled"], "--batch-size", "32"]
        run_cli(*args, *extra, check=True, timeout=TIMEOUT)
        fits[name] = json.loads((tmp_path / name / "summary.json").read_text())["fitted"]
    assert fits["one"]["combiner"]["fitted"] is True
    assert fits["two"] == fits["one"]
