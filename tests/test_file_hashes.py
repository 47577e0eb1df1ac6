"""Teacher file hashes made in the background: a new label run does not wait for them, its
run record gets them as soon as they are made, and a run stopped before that is not resumed."""

import hashlib
import json
import threading

import numpy as np
import pytest

from kdplug import UsageError, file_hashes
from kdplug.engines import label as label_engine
from kdplug.engines.label import LabelConfig, run_label
from kdplug.file_hashes import PENDING, deferred_hashes, file_hash, hash_in_background

ROWS = 447  # the test digits split


def sha256(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def held_hashes(monkeypatch):
    """Hashing of .npy files waits until the returned event is set."""
    release = threading.Event()
    real = file_hashes._sha256

    def held(path, chunk):
        if path.suffix == ".npy":
            assert release.wait(60), "never released"
        return real(path, chunk)

    monkeypatch.setattr(file_hashes, "_sha256", held)
    return release


def logits_file(tmp_path, rows=ROWS, seed=0):
    path = tmp_path / f"teacher{seed}.npy"
    np.save(path, np.random.default_rng(seed).normal(size=(rows, 10)).astype(np.float32))
    return path


def test_a_file_hashed_in_the_background_reads_pending_only_when_deferred(tmp_path, held_hashes):
    path = logits_file(tmp_path)
    hash_in_background([path, tmp_path])  # the folder is left to file_hash
    with deferred_hashes():
        assert file_hash(path) == PENDING
    with deferred_hashes(enabled=False):
        held_hashes.set()
        assert file_hash(path) == sha256(path)  # waited for
    with deferred_hashes():
        assert file_hash(path) == sha256(path)  # made: never pending again


def test_a_hash_that_fails_in_the_background_fails_the_caller(tmp_path, monkeypatch):
    path = logits_file(tmp_path)

    def broken(path, chunk):
        raise PermissionError(f"cannot read {path}")

    monkeypatch.setattr(file_hashes, "_sha256", broken)
    hash_in_background([path])
    with pytest.raises(PermissionError, match="cannot read"):
        file_hash(path)


def test_a_new_label_run_records_its_teacher_hashes_once_made(
    digits_splits, tmp_path, held_hashes, monkeypatch
):
    teacher, out = logits_file(tmp_path), tmp_path / "out"
    recorded = []
    real_write = label_engine.write_shard

    def write(shard, tensors, metadata):  # what run.json says while the shards are made
        config = json.loads((out / "run.json").read_text())["config"]
        recorded.append(config["teachers"][0]["fingerprint"])
        held_hashes.set()  # the hash finishes after the first shard
        return real_write(shard, tensors, metadata)

    monkeypatch.setattr(label_engine, "write_shard", write)
    cfg = LabelConfig(
        teachers=[f"logits:{teacher}"],
        data=digits_splits["test"],
        out=str(out),
        shard_size=100,
        progress=False,
    )
    report = run_label(cfg)
    assert recorded[0] == PENDING  # the first shard did not wait for the hash
    final = json.loads((out / "run.json").read_text())["config"]["teachers"][0]["fingerprint"]
    assert final == sha256(teacher) == report["teachers"][0]["fingerprint"]


def test_a_run_stopped_before_its_hashes_were_recorded_is_not_resumed(digits_splits, tmp_path):
    teacher, out = logits_file(tmp_path), tmp_path / "out"
    cfg = LabelConfig(
        teachers=[f"logits:{teacher}"], data=digits_splits["test"], out=str(out), progress=False
    )
    run_label(cfg)
    marker = json.loads((out / "run.json").read_text())
    marker["config"]["teachers"][0]["fingerprint"] = PENDING  # as a run killed in its first s
    (out / "run.json").write_text(json.dumps(marker))
    (out / "report.json").unlink()
    cfg.resume = True
    with pytest.raises(UsageError, match="stopped before its teacher files were hashed"):
        run_label(cfg)
    marker["config"]["teachers"][0]["fingerprint"] = sha256(teacher)  # recorded: resumes
    (out / "run.json").write_text(json.dumps(marker))
    assert run_label(cfg)["rows"] == ROWS


def test_a_resumed_run_compares_the_made_hashes(digits_splits, tmp_path):
    teacher, out = logits_file(tmp_path), tmp_path / "out"
    cfg = LabelConfig(
        teachers=[f"logits:{teacher}"], data=digits_splits["test"], out=str(out), progress=False
    )
    run_label(cfg)
    (out / "report.json").unlink()
    np.save(teacher, np.load(teacher) + 1)  # another file at the same path
    cfg.resume = True
    with pytest.raises(UsageError, match="holds a run with a different configuration"):
        run_label(cfg)
