"""Teachers from PyTorch files: TorchScript, torch.export programs and precomputed logits.

TorchScript programs run any code they hold, so they load only with the code opt-in
(``allow_code=true``, ``--allow-code`` or KDPLUG_ALLOW_CODE=1); torch.export programs are
checked first and need it only when they call more than torch's tensor operators.

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
    allow_code: bool = False,
):
    """A TorchScript program (torch.jit.save): code, so it needs allow_code=true (or
    --allow-code); options mean, std, size, classes, probs."""
    from kdplug_torch.models import load_torchscript

    return load_torchscript(ref, mean, std, size, in_chans, classes, probs, allow_code)


def export(
    ref: str,
    mean: Floats = None,
    std: Floats = None,
    size: Size = None,
    in_chans: int | None = None,
    classes: Names = None,
    probs: bool = False,
    allow_pickle: bool = False,
    allow_code: bool = False,
):
    """A torch.export program (.pt2, torch.export.save); options mean, std, size, classes, probs.

    Runs without allow_code=true when it calls only torch's tensor operators (see
    kdplug_torch.program_check); a fixed batch size is run in chunks of that size.
    """
    from kdplug_torch.models import load_exported

    return load_exported(ref, mean, std, size, in_chans, classes, probs, allow_pickle, allow_code)


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
