"""CIFAR students: mdistiller's CIFAR ResNets for 32x32 images (``cifar:resnet8x4``, ...).

- student ``cifar:ARCH``: ARCH one of resnet8, resnet14, resnet20, resnet32, resnet44,
  resnet56, resnet110 (widths 16/16/32/64) and resnet8x4, resnet32x4 (widths 32/64/128/256),
  as github.com/megvii-research/mdistiller defines them (mdistiller/models/cifar/resnet.py):
  same layers, same parameter names, so mdistiller's state dicts load. They offer timm's
  feature interface (``forward_intermediates``, ``forward_head``, ``feature_info``), so
  feature losses (``fitnet``, ``reviewkd``) and ``kdplug:`` teachers work on them.

kdplug_cifar.resnet does the work; this factory has no options.
"""

from __future__ import annotations

import kdplug

__version__ = kdplug.__version__


def cifar_student(ref: str, num_classes: int, in_chans: int):
    """mdistiller's CIFAR ResNet REF (resnet8x4, resnet32x4, resnet8/14/20/32/44/56/110)
    for 32x32 images; inputs normalized with CIFAR-100's mean and std."""
    from kdplug_cifar.resnet import build_resnet

    return build_resnet(ref, num_classes, in_chans)


@kdplug.hookimpl
def register_students(register):
    register("cifar", cifar_student)
