"""mdistiller's CIFAR ResNets (BasicBlock, three stages, average pool, linear head) with
timm's feature interface.

Written after mdistiller/models/cifar/resnet.py (github.com/megvii-research/mdistiller):
the same modules under the same names (``conv1``, ``bn1``, ``layer1``-``layer3``,
``downsample.0/1``, ``fc``) and the same initialization, so a state dict of theirs loads.
One difference: the pool is global (``adaptive_avg_pool2d``) where theirs is
``AvgPool2d(8)``; on 32x32 inputs the last map is 8x8 and both are the same.

Feature stages (timm's ``forward_intermediates`` indices): 0 the stem (conv, BN, ReLU),
1-3 the outputs of ``layer1``-``layer3`` after their last ReLU (mdistiller's ``feats``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdplug.api import UsageError

THIN = (16, 16, 32, 64)  # mdistiller's resnet8 ... resnet110
WIDE = (32, 64, 128, 256)  # its resnet8x4, resnet32x4
ARCHITECTURES = {
    **{f"resnet{depth}": (depth, THIN) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, WIDE),
    "resnet32x4": (32, WIDE),
}
# mdistiller's CIFAR-100 normalization (mdistiller/dataset/cifar100.py)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
INPUT_SIZE = (3, 32, 32)


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut a strided 1x1
    conv + BN where the width or size changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """A CIFAR ResNet of ``depth`` (6n + 2) with stem width ``widths[0]`` and stage widths
    ``widths[1:]`` (strides 1, 2, 2): ``[B, in_chans, 32, 32]`` -> logits ``[B, C]``."""

    def __init__(
        self, arch: str, depth: int, widths: tuple[int, ...], num_classes: int, in_chans: int
    ):
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        inplanes, layers = widths[0], []
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            layers.append(
                nn.Sequential(
                    *(
                        BasicBlock(inplanes if i == 0 else planes, planes, stride if i == 0 else 1)
                        for i in range(blocks)
                    )
                )
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_info = [
            {"num_chs": widths[0], "reduction": 1, "module": "bn1"},
            {"num_chs": widths[1], "reduction": 1, "module": "layer1"},
            {"num_chs": widths[2], "reduction": 2, "module": "layer2"},
            {"num_chs": widths[3], "reduction": 4, "module": "layer3"},
        ]
        self.pretrained_cfg = {
            "architecture": arch,
            "input_size": INPUT_SIZE,
            "mean": CIFAR100_MEAN,
            "std": CIFAR100_STD,
            "num_classes": num_classes,
            "first_conv": "conv1",
            "classifier": "fc",
        }
        # the student's input normalization (distill's): CIFAR-100's for RGB inputs, else
        # None (distill measures it on --train)
        self.input_normalization = (CIFAR100_MEAN, CIFAR100_STD) if in_chans == 3 else None
        self.model_args: dict = {}  # the factory takes no options
        for m in self.modules():  # mdistiller's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def stages(self) -> list[nn.Module]:
        """The four feature stages, in order: the stem, then layer1-layer3."""
        return [
            nn.Sequential(self.conv1, self.bn1, nn.ReLU()),
            self.layer1,
            self.layer2,
            self.layer3,
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The last stage's map -> global average pool -> ``fc`` (skipped with pre_logits)."""
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the stage outputs at ``indices`` (None: all four;
        n: the last n; a list, negatives from the last) and, unless ``intermediates_only``,
        the last stage's map (``forward_head``'s input)."""
        from timm.models._features import feature_take_indices

        assert output_fmt == "NCHW", "output_fmt must be NCHW"
        stages = self.stages()
        take, last = feature_take_indices(len(stages), indices)
        intermediates = []
        for i, stage in enumerate(
            stages[: last + 1] if stop_early or intermediates_only else stages
        ):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)


def build_resnet(arch: str, num_classes: int, in_chans: int) -> CifarResNet:
    """mdistiller's CIFAR ResNet ``arch`` for ``num_classes`` classes and ``in_chans``
    channels."""
    if arch not in ARCHITECTURES:
        raise UsageError(
            f"cifar:{arch}: unknown CIFAR ResNet; choose one of {', '.join(ARCHITECTURES)}"
        )
    depth, widths = ARCHITECTURES[arch]
    return CifarResNet(arch, depth, widths, num_classes, in_chans)
