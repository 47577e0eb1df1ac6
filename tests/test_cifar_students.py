"""The ``cifar:`` students (plugins/kdplug_cifar): mdistiller's CIFAR ResNets with timm's
feature interface, saved and loaded as student directories and ``kdplug:`` teachers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdplug.api import UsageError
from kdplug.model_dir import load_student, save_student
from kdplug.plugins import create
from kdplug.spec import parse_spec

# published sizes (CRD, Tian et al. ICLR 2020, Table 1; mdistiller's README):
# resnet8x4 1.23 M, resnet32x4 7.43 M parameters at 100 classes
PUBLISHED_MILLIONS = {"resnet8x4": 1.23, "resnet32x4": 7.43}


class ReferenceBlock(nn.Module):
    """mdistiller's BasicBlock (mdistiller/models/cifar/resnet.py), transcribed."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ReferenceResNet(nn.Module):
    """mdistiller's ResNet(depth, num_filters, "basicblock"), transcribed: its layers, its
    _make_layer, AvgPool2d(8); forward gives the logits and its ``feats`` (f0-f3)."""

    def __init__(self, depth, num_filters, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [ReferenceBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [ReferenceBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return self.fc(self.avgpool(f3).flatten(1)), [f0, f1, f2, f3]


REFERENCE = {"resnet8x4": (8, [32, 64, 128, 256]), "resnet32x4": (32, [32, 64, 128, 256])}


def cifar(arch: str, num_classes: int = 100, in_chans: int = 3) -> nn.Module:
    return create("students", parse_spec(f"cifar:{arch}"), num_classes, in_chans)


def scrambled(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with random BatchNorm statistics (so BN is not the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model.eval()


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(REFERENCE))
def test_cifar_resnet_is_mdistillers_network(arch):
    ours = cifar(arch)
    reference = ReferenceResNet(*REFERENCE[arch], num_classes=100)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e6, 2) == PUBLISHED_MILLIONS[arch]
    # the same parameter names and shapes: mdistiller's weights load as they are
    reference.load_state_dict(ours.state_dict(), strict=True)
    scrambled(ours)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = reference.eval()(x)
        final, features = ours.forward_intermediates(x)
        close(ours(x), logits)
        close(ours.forward_head(final), logits)
    assert [f.shape for f in features] == [f.shape for f in feats]
    for got, want in zip(features, feats):
        close(got, want)


def test_cifar_resnet_offers_timms_feature_interface():
    model = scrambled(cifar("resnet8", num_classes=10, in_chans=1))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (3, 10)
        final, every = model.forward_intermediates(x)
        _, last_three = model.forward_intermediates(x, indices=3)
        _, chosen = model.forward_intermediates(x, indices=[0, -1])
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert torch.equal(model.forward_head(final), logits)
    assert [tuple(f.shape[1:]) for f in every] == [
        (16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)
    ]  # fmt: skip
    assert [info["num_chs"] for info in model.feature_info] == [16, 16, 32, 64]
    assert all(torch.equal(a, b) for a, b in zip(last_three, every[1:]))
    assert torch.equal(chosen[0], every[0]) and torch.equal(chosen[1], every[3])
    assert len(only) == 1 and torch.equal(only[0], every[1])
    assert model.forward_head(final, pre_logits=True).shape == (3, 64)
    with pytest.raises(AssertionError, match="out of range"):
        model.forward_intermediates(x, indices=[4])
    # CIFAR-100's normalization for RGB inputs only; 32x32 inputs
    assert model.input_normalization is None
    assert cifar("resnet8x4").input_normalization[0] == (0.5071, 0.4867, 0.4408)
    assert cifar("resnet8x4").pretrained_cfg["input_size"] == (3, 32, 32)


def test_unknown_cifar_architecture_is_one_line():
    with pytest.raises(UsageError) as caught:
        cifar("resnet9")
    assert str(caught.value).startswith(
        "cifar:resnet9: unknown CIFAR ResNet; choose one of resnet8,"
    )


def save_cifar_student(path, model, classes):
    """``model`` as distill saves a ``cifar:`` student (kdplug.engines.distill.save_model_dir)."""
    mean, std = model.input_normalization
    save_student(
        path,
        model,
        architecture=model.pretrained_cfg["architecture"],
        classes=classes,
        input_size=[3, 32, 32],
        mean=list(mean),
        std=list(std),
        model_args=model.model_args,
        fields={"student": "cifar"},
    )


def test_cifar_student_directory_and_kdplug_teacher_with_intermediates(tmp_path):
    classes = [f"c{i}" for i in range(5)]
    model = scrambled(cifar("resnet8x4", num_classes=5))
    save_cifar_student(tmp_path / "student", model, classes)
    loaded, config = load_student(tmp_path / "student")
    assert config["student"] == "cifar" and config["architecture"] == "resnet8x4"
    x = torch.rand(2, 3, 32, 32)  # [0, 1] images, as the data path gives them
    model_x = (x - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        config["std"]
    ).view(1, 3, 1, 1)
    teacher = create("teachers", f"kdplug:{tmp_path / 'student'}")
    assert teacher.classes == classes and teacher.intermediates is not None
    with torch.no_grad():
        assert torch.allclose(loaded(model_x), model(model_x), atol=1e-6)
        logits, features = teacher.intermediates(x, [-3, -2, -1])
        assert torch.allclose(logits, model(model_x), atol=1e-5)
        assert torch.allclose(teacher(x), logits, atol=1e-6)
        _, own = model.forward_intermediates(model_x, indices=[-3, -2, -1])
    assert [tuple(f.shape[1:]) for f in features] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(features, own))
    with pytest.raises(UsageError, match="the teacher's model resnet8x4 has no feature stages"):
        teacher.intermediates(x, [5])
