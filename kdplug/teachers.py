"""The teacher set: K teachers on one batch, aligned to the run's label space.

Teacher contract (see docs/plugins.md): a callable ``teacher(x) -> logits [B, C_t]`` with
optional ``classes`` (names in output order), ``fingerprint`` (hash of its files) and
``uses_row_index`` (called as ``teacher(x, index)`` with the rows' dataset positions).
Probability outputs are passed as log-probabilities (``log p``, exact zeros as
``ops.IMPOSSIBLE``), so a temperature never moves mass onto a class with probability 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdplug.errors import UsageError
from kdplug.ops import IMPOSSIBLE


@dataclass
class TeacherOutputs:
    """What any producer of teacher outputs (live teachers, the store) hands downstream."""

    logits: torch.Tensor  # [K, B, C] float32, aligned to the run's classes
    known: torch.Tensor  # [K, C] bool: teacher k can predict class c
    bad_rows: torch.Tensor | None = None  # [B] bool: some teacher gave NaN/Inf (skipped)


def alignment(
    teacher_classes: Sequence[Any] | None, classes: Sequence[str], name: str
) -> torch.Tensor | None:
    """Index into the teacher's outputs for each run class (-1 where the teacher lacks it).

    None means the teacher has no class names and its outputs are taken in run order.
    """
    if teacher_classes is None:
        return None
    own = [str(c) for c in teacher_classes]
    position = {c: i for i, c in enumerate(own)}
    index = torch.tensor([position.get(str(c), -1) for c in classes], dtype=torch.long)
    if not (index >= 0).any():
        raise UsageError(
            f"teacher {name} shares no class with the data: teacher classes {own[:20]}, "
            f"data classes {list(classes)[:20]}"
        )
    return index


class TeacherSet:
    """Runs K teachers on a batch and aligns their logits to ``classes``.

    ``temperatures`` (from calibration) divide each teacher's logits before alignment.
    ``skip_bad_rows`` marks rows where a teacher returns NaN/Inf instead of failing.
    """

    def __init__(
        self,
        teachers: Sequence[Any],
        names: Sequence[str],
        classes: Sequence[str],
        temperatures: Sequence[float] | None = None,
        skip_bad_rows: bool = False,
    ):
        if not teachers:
            raise UsageError("no teacher given (use --teacher SPEC)")
        self.teachers = list(teachers)
        self.names = list(names)
        self.classes = list(classes)
        self.temperatures = list(temperatures) if temperatures else [1.0] * len(self.teachers)
        self.skip_bad_rows = skip_bad_rows
        self.index = [
            alignment(getattr(t, "classes", None), self.classes, n)
            for t, n in zip(self.teachers, self.names)
        ]
        C = len(self.classes)
        self.known = torch.stack(
            [torch.ones(C, dtype=torch.bool) if i is None else i >= 0 for i in self.index]
        )
        self.batches_seen = 0

    def __len__(self) -> int:
        return len(self.teachers)

    def to(self, device: torch.device | str) -> TeacherSet:
        for teacher in self.teachers:
            if isinstance(teacher, torch.nn.Module):
                teacher.to(device)
                teacher.eval()
        return self

    def fingerprints(self) -> list[str | None]:
        return [getattr(t, "fingerprint", None) for t in self.teachers]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, index: torch.Tensor | None = None) -> TeacherOutputs:
        """Run every teacher once on ``x`` and return aligned ``[K, B, C]`` logits.

        ``index`` holds the batch's row positions in its dataset; teachers with
        ``uses_row_index = True`` (precomputed logits) are called as ``teacher(x, index)``.
        """
        B, C = x.shape[0], len(self.classes)
        out = torch.full(
            (len(self.teachers), B, C), IMPOSSIBLE, dtype=torch.float32, device=x.device
        )
        bad = torch.zeros(B, dtype=torch.bool, device=x.device)
        for k, (teacher, name, index, temp) in enumerate(
            zip(self.teachers, self.names, self.index, self.temperatures)
        ):
            if getattr(teacher, "uses_row_index", False):
                if index is None:
                    raise UsageError(f"teacher {name} needs row indices, which this run lacks")
                z = teacher(x, index)
            else:
                z = teacher(x)
            z = torch.as_tensor(z).to(device=x.device, dtype=torch.float32)
            if z.dim() != 2 or z.shape[0] != B:
                raise UsageError(
                    f"teacher {name} returned shape {tuple(z.shape)}, expected [{B}, classes]"
                )
            if index is None and z.shape[1] != C:
                raise UsageError(
                    f"teacher {name} predicts {z.shape[1]} classes but the data has {C} "
                    f"({self.classes[:20]}); give the teacher class names or matching data"
                )
            if index is not None and z.shape[1] <= int(index.max()):
                raise UsageError(
                    f"teacher {name} returned {z.shape[1]} logits but names "
                    f"{int(index.max()) + 1}+ classes"
                )
            finite = torch.isfinite(z).all(dim=1)
            if not finite.all():
                if not self.skip_bad_rows:
                    rows = (~finite).nonzero().flatten()[:5].tolist()
                    raise UsageError(
                        f"teacher {name} returned NaN or Inf logits in batch "
                        f"{self.batches_seen} (rows {rows} of the batch); pass "
                        "--skip-bad-rows to drop such rows and count them"
                    )
                bad |= ~finite
                z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=IMPOSSIBLE)
            z = (z / temp).clamp_min(IMPOSSIBLE)
            if index is None:
                out[k] = z
            else:
                have = index >= 0
                out[k][:, have.to(x.device)] = z[:, index[have].to(x.device)]
        self.batches_seen += 1
        return TeacherOutputs(out, self.known.to(x.device), bad if bad.any() else None)


def load_temperatures(
    path: str, specs: Sequence[str], fingerprints: Sequence[str | None]
) -> list[float]:
    """Temperatures for ``specs`` from a ``kdplug teachers calibrate`` file.

    Entries match by spec and by the teacher's file fingerprint; a teacher whose file
    changed since calibration, or that the file does not cover, is an error.
    """
    import json
    from pathlib import Path

    try:
        entries = json.loads(Path(path).read_text())["teachers"]
    except FileNotFoundError:
        raise UsageError(f"calibration file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a kdplug calibration file ({exc})") from None
    by_spec = {e["spec"]: e for e in entries}
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
        temperatures.append(float(entry["temperature"]))
    return temperatures


def build_teacher_set(
    specs: Sequence[str],
    classes: Sequence[str],
    calibration: str | None = None,
    skip_bad_rows: bool = False,
) -> TeacherSet:
    """Build every teacher from its spec (through the plugins) into one TeacherSet."""
    from kdplug.plugins import create

    teachers = [create("teachers", spec) for spec in specs]
    temperatures = None
    if calibration:
        temperatures = load_temperatures(
            calibration, specs, [getattr(t, "fingerprint", None) for t in teachers]
        )
    return TeacherSet(teachers, specs, classes, temperatures, skip_bad_rows)
