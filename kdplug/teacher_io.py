"""What teacher plugins share: checking their files and options, and turning outputs into logits.

Used by the torchscript/export/logits, sklearn and onnx teachers. Probability outputs become
log-probabilities with exact zeros as ``ops.IMPOSSIBLE`` (see ``probs_to_logits``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kdplug.errors import UsageError
from kdplug.ops import IMPOSSIBLE
from kdplug.plugins import env_flag
from kdplug.preprocess import Preprocess

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")

log = logging.getLogger("kdplug")


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
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{source}: option {option} must be finite numbers, got {value!r}")
    return [float(v) for v in values]


def _sizes_ok(size: Any) -> bool:
    sizes = size if isinstance(size, list) else [size]
    return bool(sizes) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes
    )


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
    if size is not None and not _sizes_ok(size):
        raise UsageError(f"{source}: option size must be N or H;W of sizes >= 1, got {size!r}")
    try:
        return Preprocess(size=size, mean=mean, std=std, in_chans=in_chans)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None


NOT_GIVEN = "not given"  # where a size, mean or std that nothing set came from


def shape_defaults(
    shape: Sequence[Any], in_chans: int | None, size: Any
) -> tuple[int | None, Any, bool]:
    """``in_chans`` and ``size`` where not given, from a model input's static shape
    ``[B, C, H, W]`` (entries not ints are symbolic: left alone), and whether ``size``
    came from it."""
    if len(shape) != 4:
        return in_chans, size, False
    if in_chans is None and isinstance(shape[1], int):
        in_chans = shape[1]
    if size is None and all(isinstance(s, int) for s in shape[2:]):
        return in_chans, list(shape[2:]), True
    return in_chans, size, False


def spec_inputs(
    pre: Preprocess, options: dict[str, Any], size_from: str | None = None
) -> dict[str, Any]:
    """``Teacher.inputs`` of a teacher whose preprocessing ``pre`` its ``options`` alone set
    (TorchScript, torch.export, ONNX): each of ``size``, ``mean`` and ``std`` is from its
    option where that is not None, ``size`` from ``size_from`` where given (e.g. the
    program's input shape), the rest kdplug's default, ``NOT_GIVEN`` (no resize, no
    normalization); for the line every command logs."""
    sources = {key: f"option {key}=" for key in ("size", "mean", "std") if options[key] is not None}
    if size_from:
        sources["size"] = size_from
    return {
        "size": list(pre.size) if pre.size is not None else None,
        "mean": [round(float(v), 6) for v in pre.mean.flatten()],
        "std": [round(float(v), 6) for v in pre.std.flatten()],
        "in_chans": pre.in_chans,
        "from": {key: sources.get(key, NOT_GIVEN) for key in ("size", "mean", "std")},
    }


def probs_to_logits(probs: torch.Tensor) -> torch.Tensor:
    """``log p`` with exact zeros as IMPOSSIBLE, so no temperature puts mass on them.

    Negative "probabilities" become NaN, which the teacher set reports as a bad teacher.
    """
    probs = probs.float()
    return torch.where(probs == 0, torch.full_like(probs, IMPOSSIBLE), torch.log(probs))


def looks_like_probs(array: Any, atol: float = 1e-3) -> bool:
    """True when every row of ``array [N, C]`` is non-negative and sums to 1 (within atol)."""
    import numpy as np

    # rows of about 4M values a chunk (32 MB of float64): bounded memory at any class count
    chunk = max(1, (1 << 22) // max(1, array.shape[-1] if array.ndim > 1 else 1))
    for start in range(0, len(array), chunk):
        rows = np.asarray(array[start : start + chunk], dtype=np.float64)
        if (rows < 0).any() or not np.allclose(rows.sum(1), 1.0, atol=atol):
            return False
    return len(array) > 0


def fixed_batch(dim: Any, source: str) -> int | None:
    """The batch size a model was saved for (its input's static first dimension), or None.

    Logs once, at load, that such a model is run that many rows at a time.
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        return None
    log.info(
        "%s takes exactly %d rows per call: running it %d rows at a time, the last call "
        "padded with zero rows whose outputs are dropped",
        source,
        dim,
        dim,
    )
    return dim


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor (a teacher's outputs computed on the host) on ``device``: on CUDA copied
    from pinned memory without blocking, so the step does not wait for the copy."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def run_in_batches(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int | None
) -> torch.Tensor:
    """``run(x)``; for a model with a fixed ``batch``, ``run`` on chunks of exactly that many
    rows, the last padded with zeros and its outputs cut back to the real rows."""
    if batch is None or len(x) == batch:
        return run(x)
    outs = []
    for start in range(0, max(len(x), 1), batch):
        chunk = x[start : start + batch]
        real = len(chunk)
        if real < batch:
            chunk = torch.cat([chunk, chunk.new_zeros((batch - real, *chunk.shape[1:]))])
        outs.append(run(chunk)[:real])
    return torch.cat(outs)


def _opted_in(option: Any, env: str) -> bool:
    return option is True or env_flag(env)


def pickle_allowed(option: bool) -> bool:
    """The pickle opt-in: the spec's ``allow_pickle=true``, ``--allow-pickle`` or the env var."""
    return _opted_in(option, "KDPLUG_ALLOW_PICKLE")


def code_allowed(option: bool) -> bool:
    """The code opt-in: the spec's ``allow_code=true``, ``--allow-code`` or KDPLUG_ALLOW_CODE=1."""
    return _opted_in(option, "KDPLUG_ALLOW_CODE")


def _refusal(source: str, path: Path, what: str, kind: str, safe: str) -> UsageError:
    return UsageError(
        f"{source}: {path} {what}; if you trust this file pass --allow-{kind}, add "
        f"allow_{kind}=true to the teacher spec or set KDPLUG_ALLOW_{kind.upper()}=1, "
        f"or {safe} instead"
    )


def refuse_pickle(
    source: str, path: Path, safe_format: str, what: str = "is a pickle file"
) -> UsageError:
    """The error for a pickle loaded without the opt-in: why, and the ways out."""
    what = f"{what}, and loading a pickle runs any code stored in it"
    return _refusal(source, path, what, "pickle", f"save the model as {safe_format}")


def refuse_code(
    source: str,
    path: Path,
    what: str,
    safe: str = "export the model with torch.export or to ONNX",
) -> UsageError:
    """The error for a model file that holds code, run without the opt-in."""
    return _refusal(source, path, what, "code", safe)


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
