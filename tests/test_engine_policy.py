"""What every engine does the same way: a finished run resumed runs no teacher; one precision
policy (kdplug.device: bf16, else fp16 with a GradScaler, fp32 on the CPU); rank and barrier
calls only through kdplug.distributed."""

import ast
import contextlib
import json
from pathlib import Path

import pytest
import torch

from kdplug.device import autocast, autocast_dtype, grad_scaler
from kdplug.engines.cache import CacheConfig, run_cache
from kdplug.engines.distill import DistillConfig, distill
from kdplug.engines.label import LabelConfig, run_label
from kdplug.teachers import TeacherSet
from tests.conftest import ROOT, random_cnn_teacher

STUDENT = "timm:test_resnet"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A small TorchScript CNN on the 8x8 digits."""
    return random_cnn_teacher(tmp_path_factory.mktemp("policy") / "cnn.pt", 4, 8)


def run_distill(teacher: str, data: str, out: Path, resume: bool) -> dict:
    """kd from ``teacher`` with the auto combiner: both fitted on the labeled rows first."""
    config = DistillConfig(
        student=STUDENT, train=data, out=str(out), teachers=[teacher], epochs=1, batch_size=50
    )
    config.resume = resume
    return distill(config)


def run_label_engine(teacher: str, data: str, out: Path, resume: bool) -> dict:
    """label with ``--calibration-data``: the auto combiner is fitted before the shards."""
    config = LabelConfig(
        teachers=[teacher], data=data, out=str(out), calibration_data=data, progress=False
    )
    config.resume = resume
    return run_label(config)


def run_cache_engine(teacher: str, data: str, out: Path, resume: bool) -> dict:
    config = CacheConfig(teachers=[teacher], data=[data], out=str(out), progress=False)
    config.resume = resume
    return run_cache(config)


@pytest.mark.parametrize("engine", [run_distill, run_label_engine, run_cache_engine])
def test_a_finished_run_resumed_runs_no_teacher(
    engine, teacher, digits_splits, tmp_path, monkeypatch
):
    calls, forward = [], TeacherSet.__call__

    def counted(self, x, index=None):
        calls.append(len(x))
        return forward(self, x, index)

    monkeypatch.setattr(TeacherSet, "__call__", counted)
    out = tmp_path / "run"
    first = engine(teacher, digits_splits["labeled"], out, resume=False)
    assert calls  # the teachers ran (fitting, then training, labeling or caching)
    calls.clear()
    assert engine(teacher, digits_splits["labeled"], out, resume=True) == first
    assert calls == []  # the finished run was noticed before any fitting


def fake_cuda(monkeypatch, native_bf16: bool) -> None:
    """A CUDA device that has bfloat16 natively (Ampere and later) or only emulated (older)."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cuda_with_native_bf16_runs_in_bfloat16_unscaled(monkeypatch):
    fake_cuda(monkeypatch, native_bf16=True)
    cuda = torch.device("cuda")
    assert autocast_dtype(cuda) == torch.bfloat16
    assert autocast(cuda).fast_dtype == torch.bfloat16
    assert not grad_scaler(cuda).is_enabled()


def test_cuda_with_emulated_bf16_only_runs_in_float16_with_a_scaler(monkeypatch):
    fake_cuda(monkeypatch, native_bf16=False)
    cuda = torch.device("cuda")
    assert autocast_dtype(cuda) == torch.float16
    assert autocast(cuda).fast_dtype == torch.float16
    assert grad_scaler(cuda).is_enabled()


def test_the_cpu_stays_float32(monkeypatch):
    def no_cuda_query(*args, **kwargs):
        raise AssertionError("the CPU policy asked CUDA")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_cuda_query)
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None
    assert isinstance(autocast(cpu), contextlib.nullcontext)
    assert not grad_scaler(cpu).is_enabled()


def test_float16_training_scales_the_loss_and_resumes_with_the_scale(
    digits_splits, tmp_path, monkeypatch
):
    """The float16 path's GradScaler, enabled on the CPU (float32: scaling by a power of two
    is exact): 3 steps per epoch, the scale doubling every 2 steps without overflow."""
    import kdplug.engines.distill

    def float16_scaler(device):
        return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)

    config = dict(
        student=STUDENT, train=digits_splits["labeled"], loss="ce", epochs=2, batch_size=50
    )
    plain = distill(DistillConfig(**config, out=str(tmp_path / "plain")))

    monkeypatch.setattr(kdplug.engines.distill, "grad_scaler", float16_scaler)
    write_files = kdplug.engines.distill.end_epoch_files

    def stop_after_epoch_1(out, trainer, parts, progress, line, improved):
        write_files(out, trainer, parts, progress, line, improved)
        raise KeyboardInterrupt  # killed after epoch 1's checkpoint

    out = tmp_path / "scaled"
    monkeypatch.setattr(kdplug.engines.distill, "end_epoch_files", stop_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(**config, out=str(out)))
    stored = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["scaler"]
    assert (stored["scale"], stored["_growth_tracker"]) == (2.0**11, 1)

    monkeypatch.setattr(kdplug.engines.distill, "end_epoch_files", write_files)
    scaled = distill(DistillConfig(**config, out=str(out), resume=True))
    stored = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["scaler"]
    assert stored["scale"] == 2.0**13  # a fresh scaler would be at 2**11 after 3 steps
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plain_lines = (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    assert [line["loss"] for line in lines] == [json.loads(p)["loss"] for p in plain_lines]
    assert scaled["final_val_accuracy"] == plain["final_val_accuracy"]


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a chain of attributes on a name, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def uses(tree: ast.AST, prefix: str) -> list[int]:
    """Lines that use ``prefix`` (``torch.distributed``): attributes, imports of it."""
    module, _, name = prefix.rpartition(".")
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and dotted(node) == prefix:
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(
            alias.name == prefix or alias.name.startswith(prefix + ".") for alias in node.names
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            inside = node.module == prefix or node.module.startswith(prefix + ".")
            if inside or (node.module == module and any(a.name == name for a in node.names)):
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize(
    ("prefix", "owner"),
    [
        ("torch.distributed", "kdplug/distributed.py"),
        ("torch.autocast", "kdplug/device.py"),
        ("torch.amp", "kdplug/device.py"),
        ("torch.cuda.amp", "kdplug/device.py"),
        ("torch.cuda.is_bf16_supported", "kdplug/device.py"),
    ],
)
def test_one_module_owns_each_policy(prefix, owner):
    """Ranks and barriers go through kdplug.distributed, precision through kdplug.device."""
    found = []
    for path in sorted([*(ROOT / "kdplug").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]):
        name = path.relative_to(ROOT).as_posix()
        if name != owner:
            found += [f"{name}:{line}" for line in uses(ast.parse(path.read_text()), prefix)]
    assert found == [], f"{prefix} outside {owner}"
