"""Choosing the device, its precision and seeding, the same way for every engine.

Precision: on a CUDA device every engine (label, cache, distill, eval) runs its models under
``autocast`` in bfloat16 where the GPU has it natively (``torch.cuda.is_bf16_supported(
including_emulation=False)``: Ampere and later, ROCm), else in float16, and distill scales
its loss for float16 (``grad_scaler``); on the CPU and MPS everything stays float32.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

from kdplug.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto"):
    """``auto`` -> cuda if available, else mps, else cpu; an unavailable choice is an error.

    Under torchrun ``cuda`` is this process's own GPU (``distributed.gpu_index``)."""
    import torch

    from kdplug import distributed

    if name == "auto":
        if torch.cuda.is_available():
            return distributed.cuda_device()
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    if kind == "cuda" and distributed.launched():
        if name != "cuda":
            raise UsageError(
                f"--device {name} under torchrun would put every rank on one GPU: give "
                "--device cuda (each rank takes its own, LOCAL_RANK) and choose the GPUs "
                "with CUDA_VISIBLE_DEVICES"
            )
        return distributed.cuda_device()
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available")
    return torch.device(name)


def autocast_dtype(device: Any) -> Any:
    """The dtype models run in under ``autocast`` on ``device`` (a ``torch.device``):
    bfloat16 on a CUDA device with native bfloat16, float16 on an older one, None (float32,
    no autocast) elsewhere. CUDA means the current CUDA device (torchrun sets each rank's)."""
    import torch

    if device.type != "cuda":
        return None
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16


def autocast(device: Any) -> Any:
    """The mixed-precision context for forward passes on ``device`` (``autocast_dtype``)."""
    import torch

    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: Any) -> Any:
    """A context where ``autocast`` is off: float32 math inside a mixed-precision step
    (the combiner, as where it was fitted)."""
    import torch

    return torch.autocast(device.type, enabled=False)


def memory_format(device: Any) -> Any:
    """The student's memory format on ``device``: channels_last on CUDA (faster convolutions
    under autocast), else contiguous. Teachers always get contiguous inputs: a saved program
    may ``view`` its activations, which channels_last ones do not allow."""
    import torch

    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def grad_scaler(device: Any) -> Any:
    """A ``torch.amp.GradScaler`` for training on ``device``: enabled only when ``autocast``
    runs in float16 (whose small gradients underflow), else a pass-through."""
    import torch

    enabled = autocast_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG for one epoch of one rank from ``(seed, epoch, rank)``: augmentation,
    mixup, store views and dropout masks differ between ranks, and a run resumed at an epoch
    draws what the uninterrupted run drew there, on any number of GPUs, with no RNG state
    saved (a saved per-GPU state cannot be restored where fewer GPUs are visible)."""
    import numpy as np

    seed_everything(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
