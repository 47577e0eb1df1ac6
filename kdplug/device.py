"""Choosing the device and seeding, the same way for every engine."""

from __future__ import annotations

import random

from kdplug.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto"):
    """``auto`` -> cuda if available, else mps, else cpu; an unavailable choice is an error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
