"""An interrupted `kdplug label` (SIGKILL mid-run) resumed with --resume gives exactly the
rows of an uninterrupted run."""

import json

import datasets
import numpy as np
import pytest
import torch

from kdplug.engines.label import LabelConfig, run_label
from tests.conftest import kill_when, run_cli

SHARD_SIZE = 50
ROWS = 447  # the test digits split: 9 shards, the last one partial


def label_args(teacher: str, data: str, out) -> list[str]:
    return [
        *["label", "--teacher", teacher, "--data", data, "--out", str(out)],
        *["--generator", "class-balanced,quantile=0.8", "--device", "cpu"],
        *["--shard-size", str(SHARD_SIZE), "--batch-size", "25"],
    ]


def finished_shards(out) -> int:
    return len(list((out / ".shards").glob("*.safetensors")))


def test_killed_run_resumes_to_exactly_the_uninterrupted_rows(
    slow_teacher, digits_splits, tmp_path
):
    data = digits_splits["test"]
    full = tmp_path / "full"
    run_label(
        LabelConfig(
            teachers=[slow_teacher],
            data=data,
            out=str(full),
            generator="class-balanced,quantile=0.8",
            device="cpu",
            shard_size=SHARD_SIZE,
            batch_size=25,
            progress=False,
        )
    )

    part = tmp_path / "part"
    kill_when(label_args(slow_teacher, data, part), lambda: finished_shards(part) >= 3)
    done = finished_shards(part)
    assert 3 <= done < ROWS // SHARD_SIZE
    assert not (part / "report.json").exists()
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(part))

    result = run_cli(*label_args(slow_teacher, data, part), "--resume")
    assert result.returncode == 0, result.stderr
    report = json.loads((part / "report.json").read_text())
    assert report["rows_labeled_this_run"] == ROWS - done * SHARD_SIZE

    expected = datasets.load_from_disk(str(full))
    resumed = datasets.load_from_disk(str(part))
    assert resumed.features == expected.features
    for column in expected.column_names:
        assert np.array_equal(np.asarray(resumed[column]), np.asarray(expected[column])), column
    first = json.loads((full / "report.json").read_text())
    for key in ("seconds", "rows_labeled_this_run"):
        first.pop(key), report.pop(key)
    assert report == first


def test_shards_cover_fixed_row_ranges_and_only_complete_files_count(tmp_path):
    from kdplug.shards import Shard, is_finished, plan_shards, read_shard, write_shard

    shards = plan_shards(10, 4, tmp_path)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    assert [s.index for s in shards] == [0, 1, 2]
    first, second, last = shards
    write_shard(first, {"target": torch.arange(4.0)})
    assert is_finished(first) and torch.equal(read_shard(first)["target"], torch.arange(4.0))
    second.path.write_bytes(b"half a file")  # not what write_shard leaves: redone
    other_rows = Shard(2, 8, 9, last.path)  # a file at this path for other rows: redone
    write_shard(other_rows, {"target": torch.zeros(1)})
    assert not is_finished(second) and not is_finished(last)
    assert sorted(p.name for p in tmp_path.iterdir()) == [s.path.name for s in shards]
