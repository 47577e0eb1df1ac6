"""kdplug_timm: timm students and teachers, the student directory, safe weight loading."""

import json

import pytest
import torch
import torch.nn.functional as F

from kdplug import UsageError
from kdplug.model_dir import REQUIRED, save_student
from kdplug.plugins import create

ARCH = "test_resnet"


def _scrambled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics too, so a lost buffer would change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(
                torch.rand(module.running_var.shape, generator=generator) + 0.5
            )
    return model.eval()


def test_student_directory_loads_with_timm_alone(tmp_path):
    import safetensors.torch
    import timm

    student = _scrambled(create("students", f"timm:{ARCH}", 4, 1))
    save_student(
        tmp_path / "student",
        student,
        architecture=ARCH,
        classes=["a", "b", "c", "d"],
        input_size=[1, 12, 12],
        mean=[0.25],
        std=[0.5],
    )
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert set(REQUIRED) <= set(config)
    assert config["num_classes"] == 4 and config["in_chans"] == 1
    assert config["input_size"] == [1, 12, 12] and config["classes"] == ["a", "b", "c", "d"]

    # the documented recipe, with timm and safetensors only
    model = timm.create_model(
        config["architecture"], num_classes=config["num_classes"], in_chans=config["in_chans"]
    )
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "student" / "model.safetensors"))
    model.eval()
    x = torch.rand(3, 1, 20, 20)
    resized = F.interpolate(x, size=(12, 12), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = model((resized - mean) / std)
        assert torch.allclose(model(resized), student(resized))

        # the same directory as a kdplug teacher (DIR/student or the run directory above it)
        for ref in (tmp_path / "student", tmp_path):
            teacher = create("teachers", f"kdplug:{ref}")
            assert teacher.classes == ["a", "b", "c", "d"]
            assert teacher.fingerprint.startswith("sha256:")
            assert torch.allclose(teacher(x), expected, atol=1e-5)


def test_timm_teacher_from_safetensors_and_state_dict(tmp_path):
    import safetensors.torch

    source = _scrambled(create("students", f"timm:{ARCH}", 3, 1), seed=1)
    state = source.state_dict()
    safetensors.torch.save_file(state, tmp_path / "t.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "t.pth")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        expected = source(F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True) - 0.5)
    for file in ("t.safetensors", "t.pth"):
        # num_classes and in_chans are read off the checkpoint
        teacher = create(
            "teachers",
            f"timm:{ARCH},checkpoint={tmp_path / file},size=16,mean=0.5,std=1,classes=x;y;z",
        )
        assert teacher.classes == ["x", "y", "z"]
        assert teacher.fingerprint.startswith("sha256:")
        with torch.no_grad():
            assert torch.allclose(teacher(x), expected, atol=1e-5)


def test_a_pretrained_timm_teacher_is_fed_its_pretrained_cfg(tmp_path):
    import timm

    model = timm.create_model(ARCH, num_classes=2)
    torch.save(model.state_dict(), tmp_path / "t.pt")  # fine-tuned from pretrained weights
    teacher = create("teachers", f"timm:{ARCH},pretrained=true,checkpoint={tmp_path / 't.pt'}")
    cfg = model.pretrained_cfg
    assert teacher.preprocess.size == tuple(cfg["input_size"][1:])
    assert teacher.preprocess.mean.flatten().tolist() == pytest.approx(list(cfg["mean"]))
    assert teacher(torch.rand(1, 1, 8, 8)).shape == (1, 2)  # grayscale repeated to 3 channels


def test_corrupt_or_truncated_checkpoint_is_a_usage_error_naming_the_file(tmp_path):
    import safetensors.torch

    state = create("students", f"timm:{ARCH}", 3, 1).state_dict()
    safetensors.torch.save_file(state, tmp_path / "good.safetensors")
    torch.save(state, tmp_path / "good.pt")
    for name in ("good.safetensors", "good.pt"):
        data = (tmp_path / name).read_bytes()
        bad = tmp_path / f"cut-{name}"
        bad.write_bytes(data[: len(data) // 3])
        with pytest.raises(UsageError, match=f"cut-{name}.*corrupt"):
            create("teachers", f"timm:{ARCH},checkpoint={bad}")
        with pytest.raises(UsageError, match=f"cut-{name}"):
            create("students", f"timm:{ARCH},checkpoint={bad}", 3, 1)
    with pytest.raises(UsageError, match="does not fit"):
        create("teachers", f"timm:test_efficientnet,checkpoint={tmp_path / 'good.pt'}")
    with pytest.raises(UsageError, match="checkpoint not found"):
        create("teachers", f"timm:{ARCH},checkpoint={tmp_path / 'missing.pt'}")


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match="evil.pt"):
        create("teachers", f"timm:{ARCH},checkpoint={tmp_path / 'evil.pt'}")
    assert not (tmp_path / "pwned").exists()


def test_student_starts_from_a_student_directory(tmp_path):
    first = _scrambled(create("students", f"timm:{ARCH}", 4, 1), seed=2)
    save_student(
        tmp_path / "s",
        first,
        architecture=ARCH,
        classes=list("abcd"),
        input_size=[1, 8, 8],
        mean=[0.1],
        std=[0.3],
    )
    same = create("students", f"timm:{ARCH},checkpoint={tmp_path / 's'}", 4, 1)
    assert same.input_normalization == ([0.1], [0.3])
    assert all(
        torch.equal(a, b) for a, b in zip(same.state_dict().values(), first.state_dict().values())
    )
    # another class count: the body is loaded, the classifier is new
    other = create("students", f"timm:{ARCH},checkpoint={tmp_path / 's'}", 7, 1)
    assert other.fc.out_features == 7
    assert torch.equal(other.conv1[0].weight, first.conv1[0].weight)
    assert create("students", f"timm:{ARCH}", 4, 1).input_normalization is None


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("teachers", "timm:resnet_18,checkpoint=x.pt", "did you mean 'resnet18'"),
        ("teachers", f"timm:{ARCH}", "needs checkpoint=PATH or pretrained=true"),
        ("teachers", f"timm:{ARCH},pretrained=true", "pretrained weights could not be loaded"),
        ("students", f"timm:{ARCH},drop_path_rate=1.5", "drop_path_rate must be in"),
        ("students", f"timm:{ARCH},mean=0.5", "both mean and std"),
        ("teachers", "kdplug:/no/such/dir", "no such student directory"),
    ],
)
def test_bad_specs_are_usage_errors(kind, spec, message):
    args = (3, 1) if kind == "students" else ()
    with pytest.raises(UsageError, match=message):
        create(kind, spec, *args)
