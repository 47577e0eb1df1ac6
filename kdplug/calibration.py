"""Temperature scaling of teachers (Guo et al. 2017) and the calibration file.

One scalar ``T > 0`` per teacher divides its logits; it is fitted by minimizing the NLL of
``softmax(z / T)`` on labeled rows and never changes a teacher's argmax. For a teacher
whose outputs are probabilities ``z = log p``, so ``softmax(z / T) ∝ p^(1/T)``; classes
with probability exactly 0 (logit ``ops.IMPOSSIBLE``) stay at 0 for every T.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from kdplug.errors import UsageError
from kdplug.ops import IMPOSSIBLE

# fitted temperatures are kept in this range, so a perfectly separable split cannot push
# T to 0 (or a useless teacher to infinity)
T_MIN, T_MAX = 0.05, 20.0
MAX_NEWTON_STEPS = 100  # bisection alone would reach 1e-12 in about 45


def apply_temperature(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``logits [..., C]`` divided by T, impossible classes left at IMPOSSIBLE.

    Each row is shifted so its maximum is 0 first (softmax does not change), so the
    best class stays above IMPOSSIBLE for any T > 0 and the argmax never moves.
    Keeps float64 input in float64; T may be a tensor (differentiable).
    """
    z = logits if logits.is_floating_point() else logits.float()
    impossible = z <= IMPOSSIBLE
    top = z.masked_fill(impossible, -math.inf).amax(-1, keepdim=True)
    top = torch.nan_to_num(top, nan=0.0, posinf=0.0, neginf=0.0)
    scaled = ((z - top) / temperature).clamp_min(IMPOSSIBLE)
    return scaled.masked_fill(impossible, IMPOSSIBLE)


def _usable(
    logits: torch.Tensor, labels: torch.Tensor, known: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labeled rows whose label the teacher can predict at all, with masked logits."""
    z = logits.double()
    if known is not None:
        z = z.masked_fill(~known.to(z.device).expand_as(z), IMPOSSIBLE)
    labels = labels.to(z.device).long()
    rows = labels >= 0
    safe = labels.clamp_min(0)
    rows &= z[torch.arange(len(z), device=z.device), safe] > IMPOSSIBLE
    return z[rows], labels[rows]


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, known: torch.Tensor | None = None
) -> float:
    """The T in [T_MIN, T_MAX] minimizing the NLL of ``softmax(logits / T)``.

    ``logits [N, C]``, ``labels [N]`` (-1 rows ignored), ``known [C]`` or ``[N, C]`` bool
    (classes the teacher can predict). Rows whose label the teacher gives probability 0
    say nothing about T and are left out. The NLL is convex in ``s = 1 / T``: Newton's
    method on its exact first and second derivatives, kept inside a bracket of the
    minimum (bisection where a step leaves it); a handful of passes over the rows.
    """
    z, y = _usable(logits, labels, known)
    if len(y) == 0:
        raise UsageError("no labeled rows that the teacher can predict; cannot fit a temperature")
    impossible = z <= IMPOSSIBLE
    top = z.masked_fill(impossible, -math.inf).amax(1, keepdim=True)
    # each row shifted to a maximum of 0 (as apply_temperature); an impossible class far
    # enough below that exp(s * d) is exactly 0 for every s in range
    d = (z - top).masked_fill(impossible, IMPOSSIBLE * T_MAX * 10)
    d_label = d[torch.arange(len(y)), y]
    low, high, s = 1 / T_MAX, 1 / T_MIN, 1.0
    for _ in range(MAX_NEWTON_STEPS):
        slope, curvature = _nll_derivatives(d, d_label, s)
        low, high = (low, s) if slope > 0 else (s, high)
        step = s - slope / curvature if curvature > 0 else math.nan
        if not low < step < high:
            step = (low + high) / 2
        settled = abs(step - s) <= 1e-9 * s or high - low <= 1e-12
        s = step
        if settled:
            break
    return float(min(max(1 / s, T_MIN), T_MAX))


def _nll_derivatives(d: torch.Tensor, d_label: torch.Tensor, s: float) -> tuple[float, float]:
    """First and second derivatives in ``s`` of the mean NLL ``log sum_c exp(s d_c) -
    max(s d_y, IMPOSSIBLE)`` (the clamp of ``apply_temperature``) over the rows of ``d``."""
    e = (d * s).exp_()
    total = e.sum(1)
    e.mul_(d)
    first = e.sum(1) / total
    second = e.mul_(d).sum(1) / total
    label = torch.where(s * d_label > IMPOSSIBLE, d_label, torch.zeros_like(d_label))
    return float((first - label).mean()), float((second - first * first).mean())


def load_temperatures(
    path: str, specs: Sequence[str], fingerprints: Sequence[str | None]
) -> list[float]:
    """Temperatures for ``specs`` from a ``kdplug teachers calibrate`` file.

    Entries match by spec and by the teacher's file fingerprint; a teacher whose file
    changed since calibration, or that the file does not cover, is an error.
    """
    try:
        entries = json.loads(Path(path).read_text())["teachers"]
        by_spec = {e["spec"]: e for e in entries}
    except FileNotFoundError:
        raise UsageError(f"calibration file not found: {path}") from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise UsageError(f"{path} is not a kdplug calibration file ({exc})") from None
    temperatures = []
    for spec, fingerprint in zip(specs, fingerprints):
        entry = by_spec.get(spec)
        if entry is None:
            raise UsageError(f"{path} has no temperature for teacher {spec}; calibrate it first")
        if entry.get("fingerprint") != fingerprint:
            raise UsageError(
                f"teacher {spec} changed since {path} was written (file hash "
                "differs); calibrate it again"
            )
        temperature = entry.get("temperature")
        number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
        if not number or not math.isfinite(temperature) or temperature <= 0:
            raise UsageError(
                f"{path}: teacher {spec} has temperature {temperature!r}; a temperature "
                "must be a finite number > 0 (calibrate it again)"
            )
        temperatures.append(float(temperature))
    return temperatures
