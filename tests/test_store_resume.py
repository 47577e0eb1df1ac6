"""An interrupted `kdplug cache` (SIGKILL mid-run) resumed with --resume gives a store equal,
byte for byte, to an uninterrupted one."""

from pathlib import Path

import pytest

from kdplug.engines.cache import CacheConfig, run_cache
from kdplug.store.reader import open_store
from tests.conftest import kill_when, run_cli

SHARD_SIZE = 25
OPTIONS = dict(topk=3, views=2, augment="scale=0.5;1,brightness=0.2", seed=7)


def cache_args(teacher: str, data: list[str], out: Path) -> list[str]:
    return [
        *["cache", "--teacher", teacher, "--data", data[0], "--data", data[1]],
        *["--out", str(out), "--topk", "3", "--views", "2", "--seed", "7"],
        *["--augment", OPTIONS["augment"], "--device", "cpu"],
        *["--shard-size", str(SHARD_SIZE), "--batch-size", "25"],
    ]


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def finished_shards(out: Path) -> int:
    return len(list((out / ".shards").glob("*/*.safetensors")))


def test_killed_cache_resumes_to_a_byte_identical_store(slow_teacher, digits_splits, tmp_path):
    data = [digits_splits["labeled"], digits_splits["test"]]  # 150 + 447 rows: 6 + 18 shards
    total = 6 + 18
    full = tmp_path / "full"
    config = CacheConfig([slow_teacher], data, str(full), shard_size=SHARD_SIZE, batch_size=25)
    for key, value in OPTIONS.items():
        setattr(config, key, value)
    config.device, config.progress = "cpu", False
    run_cache(config)

    part = tmp_path / "part"
    kill_when(cache_args(slow_teacher, data, part), lambda: finished_shards(part) >= 3)
    assert 3 <= finished_shards(part) < total
    assert not (part / "store.json").exists()
    with pytest.raises(Exception, match="unfinished .* --resume"):
        open_store(part)

    result = run_cli(*cache_args(slow_teacher, data, part), "--resume")
    assert result.returncode == 0, result.stderr
    assert "on 597 rows (2 split(s))" in result.stdout
    expected, resumed = files(full), files(part)
    assert sorted(resumed) == sorted(expected)
    assert "split-1/tail.npy" in expected and not (part / ".shards").exists()
    for name, content in expected.items():
        assert resumed[name] == content, name
