"""`kdplug label` in 2 processes (torch.distributed, gloo, real subprocesses) gives the
single-process output row for row, also when killed mid-way and resumed in 1 process."""

import time

import datasets
import numpy as np
import pytest

from tests.conftest import invoke_cli, random_cnn_teacher, run_cli
from tests.distributed_launch import kill_all, start_torchrun

SHARD_SIZE = 40
TIMEOUT = 240


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A random CNN: 16 channels at 32x32, slow enough to be killed."""
    return random_cnn_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", 16, 32)


def label_args(teacher: str, data: str, out) -> list[str]:
    return [
        *["label", "--teacher", teacher, "--data", data, "--out", str(out)],
        *["--generator", "class-balanced,quantile=0.8", "--device", "cpu"],
        *["--shard-size", str(SHARD_SIZE), "--batch-size", "20"],
    ]


@pytest.fixture(scope="module")
def single(teacher, digits_splits, tmp_path_factory):
    """The single-process output on the unlabeled split (in this process)."""
    out = tmp_path_factory.mktemp("single") / "out"
    result = invoke_cli(*label_args(teacher, digits_splits["unlabeled"], out))
    assert result.exit_code == 0, result.output
    return datasets.load_from_disk(str(out))


def assert_same_rows(got: datasets.Dataset, expected: datasets.Dataset) -> None:
    assert got.column_names == expected.column_names
    assert len(got) == len(expected)
    for column in expected.column_names:
        np.testing.assert_array_equal(np.asarray(got[column]), np.asarray(expected[column]))


def test_two_processes_write_the_single_process_rows(teacher, digits_splits, single, tmp_path):
    out = tmp_path / "two"
    args = label_args(teacher, digits_splits["unlabeled"], out)
    result = run_cli(*args, "--nproc-per-node", "2", check=True, timeout=TIMEOUT)
    assert result.stdout.count("labeled 1200 rows") == 1  # only rank 0 reports
    assert_same_rows(datasets.load_from_disk(str(out)), single)
    assert not (out / ".shards").exists()


def finished_shards(out) -> int:
    return len(list((out / ".shards").glob("*.safetensors")))


def test_two_processes_killed_then_resumed_in_one_give_the_same_rows(
    teacher, digits_splits, single, tmp_path
):
    out = tmp_path / "killed"
    args = label_args(teacher, digits_splits["unlabeled"], out)
    process = start_torchrun(args)
    try:
        deadline = time.monotonic() + TIMEOUT
        while finished_shards(out) < 4:
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.01)
    finally:
        killed = kill_all(process)
    assert len(killed) >= 3  # the launcher and both ranks
    done = finished_shards(out)
    assert 4 <= done < 1200 // SHARD_SIZE
    assert not (out / "report.json").exists()

    result = run_cli(*args, "--resume", check=True, timeout=TIMEOUT)
    assert "labeled 1200 rows" in result.stdout
    assert_same_rows(datasets.load_from_disk(str(out)), single)
