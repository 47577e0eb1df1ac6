"""Count the host syncs kdplug code would cause on a GPU, on the CPU.

A ``TorchDispatchMode`` sees every aten call; those that make the host wait for the device
on CUDA (reading a value: ``.item()``, ``int(t)``, ``bool(t)``; a result whose shape depends
on values: ``nonzero``, boolean-mask indexing and assignment, ``unique``, ``masked_select``;
``torch.equal``) are counted where kdplug's own code makes them: the innermost frame
outside torch's dispatch machinery is a kdplug (core or plugin) line. Syncs inside
libraries (an optimizer's step, a timm model) are theirs; a GPU run shows those.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "kdplug"), str(ROOT / "plugins"))
aten = torch.ops.aten
VALUE_READS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
MASKED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


def is_sync(func, args) -> bool:
    if func in VALUE_READS:
        return True
    if func in MASKED and len(args) > 1:
        indices = args[1]
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


MACHINERY = tuple(
    str(Path(torch.__file__).parent / name)
    for name in (
        "_ops.py",
        "_tensor.py",
        "overrides.py",
        "_compile.py",
        "_dynamo/eval_frame.py",
        "utils/_python_dispatch.py",
    )
)


def caller() -> str | None:
    """``file:line`` of the kdplug line that made the current aten call, else None."""
    for frame in reversed(traceback.extract_stack()[:-1]):  # less caller() itself
        if frame.filename == __file__ or frame.filename.startswith(MACHINERY):
            continue
        if frame.filename.startswith(OURS):
            return f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"
        return None
    return None


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as syncs:`` ... ``syncs.where`` counts syncs by kdplug line."""

    def __init__(self):
        super().__init__()
        self.where: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_sync(func, args):
            line = caller()
            if line is not None:
                self.where[line] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.where.values())
