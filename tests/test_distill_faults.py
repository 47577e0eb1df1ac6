"""distill under faults: a disk that fills up mid-run, a damaged checkpoint."""

import errno

import pytest
import torch

from kdplug import UsageError
from kdplug.engines.distill import DistillConfig, distill


def test_full_disk_is_a_clear_error_and_the_last_checkpoint_survives(
    digits_splits, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    config = dict(
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        out=str(out),
        loss="ce",
        epochs=3,
        batch_size=50,
    )
    real_save, calls = torch.save, []

    def fills_up(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the checkpoint after epoch 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(UsageError, match=r"cannot write .*checkpoint\.pt: the disk is full"):
        distill(DistillConfig(**config))
    monkeypatch.setattr(torch, "save", real_save)

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    summary = distill(DistillConfig(**config, resume=True))
    assert summary["status"] == "finished" and len(summary["epoch_times_s"]) == 3


def test_a_damaged_checkpoint_is_refused_on_resume(digits_splits, tmp_path):
    out = tmp_path / "run"
    config = dict(
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        out=str(out),
        loss="ce",
        epochs=2,
        batch_size=50,
    )
    distill(DistillConfig(**config))
    (out / "summary.json").unlink()  # as if killed before the end
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=r"checkpoint\.pt is not readable.*--overwrite"):
        distill(DistillConfig(**config, resume=True))
