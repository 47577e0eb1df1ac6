"""Teachers from PyTorch files: TorchScript, torch.export programs and precomputed logits.

Model teachers adapt the data's ``[B, C, H, W]`` float32 images in ``[0, 1]`` with the
``size``/``mean``/``std``/``in_chans`` options; ``probs=true`` marks a model that ends in
softmax. ``classes=a;b;c`` names the outputs so they align with the data's classes by name.
"""

from __future__ import annotations

import kdplug

__version__ = kdplug.__version__

Floats = float | list[float] | None
Size = int | list[int] | None
Names = str | int | list[str | int] | None


def torchscript(
    ref: str,
    mean: Floats = None,
    std: Floats = None,
    size: Size = None,
    in_chans: int | None = None,
    classes: Names = None,
    probs: bool = False,
):
    """A TorchScript model file (torch.jit.save); options mean, std, size, classes, probs."""
    from kdplug_torch.models import load_torchscript

    return load_torchscript(ref, mean, std, size, in_chans, classes, probs)


def export(
    ref: str,
    mean: Floats = None,
    std: Floats = None,
    size: Size = None,
    in_chans: int | None = None,
    classes: Names = None,
    probs: bool = False,
    allow_pickle: bool = False,
):
    """A torch.export program (.pt2, torch.export.save); options mean, std, size, classes, probs."""
    from kdplug_torch.models import load_exported

    return load_exported(ref, mean, std, size, in_chans, classes, probs, allow_pickle)


def logits(
    ref: str,
    key: str | None = None,
    column: str | None = None,
    probs: bool | str = "auto",
    classes: Names = None,
):
    """Precomputed logits/probabilities (.npy, .safetensors, parquet, saved dataset) by row."""
    from kdplug_torch.precomputed import load_logits

    return load_logits(ref, key, column, probs, classes)


@kdplug.hookimpl
def register_teachers(register):
    register("torchscript", torchscript)
    register("export", export)
    register("logits", logits)
