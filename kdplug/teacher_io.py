"""What teacher plugins share: checking their files and options, and turning outputs into logits.

Used by the torchscript/export/logits, sklearn and onnx teachers. Probability outputs become
log-probabilities with exact zeros as ``ops.IMPOSSIBLE`` (see ``probs_to_logits``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kdplug.errors import UsageError
from kdplug.ops import IMPOSSIBLE
from kdplug.preprocess import Preprocess

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")


def existing_file(ref: str, source: str) -> Path:
    """``ref`` as a Path, or a UsageError when it does not exist."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise UsageError(f"{source}: no such file: {ref}")
    return path


def class_names(value: Any, source: str) -> list[str] | None:
    """The ``classes`` option (``cat;dog`` is a list) as strings; None when not given."""
    if value is None:
        return None
    names = [str(v) for v in (value if isinstance(value, list) else [value])]
    if len(set(names)) != len(names):
        raise UsageError(f"{source}: option classes has repeated names: {names}")
    return names


def probability_flag(value: Any, source: str) -> bool | None:
    """The ``probs`` option: True, False, or None for ``auto``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() == "auto":
        return None
    raise UsageError(f"{source}: option probs must be auto, true or false, got {value!r}")


def _floats(value: Any, option: str, source: str) -> list[float] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise UsageError(f"{source}: option {option} must be a number or a;b;c list, got {value!r}")
    return [float(v) for v in values]


def preprocess(
    source: str,
    size: int | Sequence[int] | None,
    mean: Any,
    std: Any,
    in_chans: int | None,
) -> Preprocess:
    """A Preprocess from the ``size``/``mean``/``std``/``in_chans`` options, checked.

    ``in_chans`` defaults to the length of ``mean`` (or ``std``) when that is a list of 3.
    """
    mean, std = _floats(mean, "mean", source), _floats(std, "std", source)
    lengths = {len(v) for v in (mean, std) if v is not None and len(v) > 1}
    if len(lengths) > 1:
        raise UsageError(f"{source}: options mean and std have different lengths")
    if in_chans is None and lengths:
        in_chans = lengths.pop()
    if in_chans is not None and (not isinstance(in_chans, int) or in_chans < 1):
        raise UsageError(f"{source}: option in_chans must be >= 1, got {in_chans}")
    if size is not None and not isinstance(size, int | list):
        raise UsageError(f"{source}: option size must be N or H;W, got {size!r}")
    try:
        return Preprocess(size=size, mean=mean, std=std, in_chans=in_chans)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None


def probs_to_logits(probs: torch.Tensor) -> torch.Tensor:
    """``log p`` with exact zeros as IMPOSSIBLE, so no temperature puts mass on them.

    Negative "probabilities" become NaN, which the teacher set reports as a bad teacher.
    """
    probs = probs.float()
    return torch.where(probs == 0, torch.full_like(probs, IMPOSSIBLE), torch.log(probs))


def looks_like_probs(array: Any, atol: float = 1e-3) -> bool:
    """True when every row of ``array [N, C]`` is non-negative and sums to 1 (within atol)."""
    import numpy as np

    chunk = 65_536
    for start in range(0, len(array), chunk):
        rows = np.asarray(array[start : start + chunk], dtype=np.float64)
        if (rows < 0).any() or not np.allclose(rows.sum(1), 1.0, atol=atol):
            return False
    return len(array) > 0


def pickle_allowed(option: bool) -> bool:
    """The pickle opt-in: the spec's ``allow_pickle=true``, ``--allow-pickle`` or the env var."""
    env = os.environ.get("KDPLUG_ALLOW_PICKLE", "").strip().lower()
    return option or env in ("1", "true", "yes", "on")


def refuse_pickle(
    source: str, path: Path, safe_format: str, what: str = "is a pickle file"
) -> UsageError:
    """The error for a pickle loaded without the opt-in: why, and the ways out."""
    return UsageError(
        f"{source}: {path} {what}, and loading a pickle runs any code stored in it; "
        "if you trust this file pass --allow-pickle, add allow_pickle=true to the teacher "
        f"spec or set KDPLUG_ALLOW_PICKLE=1, or save the model as {safe_format} instead"
    )


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force every ``torch.load`` inside to ``weights_only=True`` (even one asking for False).

    Libraries that load with pickle as a fallback (``torch.export.load``) then cannot run
    code from the file; torch's own log lines about the failure are silenced.
    """
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
