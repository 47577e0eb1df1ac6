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


def test_two_processes_match_one_process_accuracy_and_fit(teacher, digits_splits, tmp_path):
    """The same global batch: 32 rows in one process, 16 rows on each of 2. ``auto`` is
    fitted on --calibration-data: each rank runs the teachers on its share of the fit rows
    and every rank fits all of them, in one process's order, so the fit is the one-process
    fit (and the same on every rank, so every rank's targets agree)."""
    one, two = tmp_path / "one", tmp_path / "two"
    fit = ["--calibration-data", digits_splits["labeled"]]
    args = distill_args(teacher, digits_splits, one, 8)
    args[args.index("mean")] = "auto"
    run_cli(*args, *fit, "--batch-size", "32", check=True)
    args[args.index(str(one))] = str(two)
    result = run_cli(
        *args, *fit, "--batch-size", "16", "--nproc-per-node", "2", check=True, timeout=TIMEOUT
    )
    assert result.stdout.count("student written to") == 1  # only rank 0 reports
    expected = json.loads((one / "summary.json").read_text())
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert expected["fitted"]["combiner"]["fitted"] is True
    assert summary["fitted"] == expected["fitted"]
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


def test_consistency_and_feature_losses_train_under_two_processes(teacher, digits_splits, tmp_path):
    """flexmatch on kd (each rank's strong views, its share of the unlabeled rows, its own
    class-threshold state) and reviewkd (the projector inside the DDP forward) under
    torchrun: the runs finish and their own terms were trained."""
    import timm

    from kdplug.model_dir import save_student

    network = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    options = dict(architecture="test_resnet", classes=[str(c) for c in range(10)])
    save_student(tmp_path / "net", network, **options, input_size=[1, 8, 8], mean=[0.3], std=[0.4])
    runs = {
        "flexmatch": ["--loss", "flexmatch,base=kd,threshold=0.5", "--teacher", teacher],
        "reviewkd": ["--loss", "reviewkd,base=kd", "--teacher", f"kdplug:{tmp_path / 'net'}"],
    }
    for name, extra in runs.items():
        out = tmp_path / name
        run_cli(
            *["distill", "--student", "timm:test_resnet", "--combiner", "mean", *extra],
            *["--train", digits_splits["labeled"], "--unlabeled", digits_splits["test"]],
            *["--augment", "scale=0.8;1,hflip=0", "--epochs", "1", "--batch-size", "32"],
            *["--device", "cpu", "--out", str(out), "--nproc-per-node", "2"],
            check=True,
            timeout=TIMEOUT,
        )
        line = json.loads((out / "metrics.jsonl").read_text())
        term = "consistency" if name == "flexmatch" else "features"
        assert line[term] > 0, line
        state = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]
        assert ("loss" in state) if name == "flexmatch" else ("projector" in state)
