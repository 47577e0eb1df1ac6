"""The teacher set: K teachers on one batch, aligned to the run's label space.

Each teacher is a ``kdplug.components.Teacher`` (``teacher(x) -> logits [B, C_t]``, optional
``classes``, ``fingerprint``, ``uses_row_index``, ``num_rows``, ``data_fingerprint``); the
``TeacherSet`` is the live teachers' ``kdplug.components.Producer``. Probability outputs
are passed as log-probabilities (``log p``, exact zeros as ``ops.IMPOSSIBLE``), so a
temperature never moves mass onto a class with probability 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdplug.calibration import apply_temperature, load_temperatures
from kdplug.errors import BadRowsError, UsageError, running
from kdplug.ops import IMPOSSIBLE
from kdplug.spec import Spec

__all__ = [
    "TeacherOutputs",
    "TeacherSet",
    "alignment",
    "build_teacher_set",
    "create_teachers",
    "load_temperatures",
]


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
    refuse_duplicates(own, f"the classes of teacher {name}")
    position = {c: i for i, c in enumerate(own)}
    index = torch.tensor([position.get(str(c), -1) for c in classes], dtype=torch.long)
    if not (index >= 0).any():
        raise UsageError(
            f"teacher {name} shares no class with the data: teacher classes {own[:20]}, "
            f"data classes {list(classes)[:20]}"
        )
    return index


def refuse_duplicates(classes: Sequence[str], whose: str) -> None:
    """Class names must be distinct: a repeated name would make two classes one."""
    names = [str(c) for c in classes]
    if len(set(names)) < len(names):
        repeated = next(c for c in names if names.count(c) > 1)
        raise UsageError(
            f"class {repeated!r} appears more than once in {whose}: {names[:20]}; "
            "class names must be distinct"
        )


class TeacherSet:
    """Runs K teachers on a batch and aligns their logits to ``classes``.

    ``temperatures`` (from calibration) scale each teacher's logits before alignment
    (``calibration.apply_temperature``: a class with probability 0 stays at 0).
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
        refuse_duplicates(self.classes, "the run's classes (--classes, else the data's)")
        self.temperatures = list(temperatures) if temperatures else [1.0] * len(self.teachers)
        self.skip_bad_rows = skip_bad_rows
        self.index = [
            alignment(getattr(teacher, "classes", None), self.classes, name)
            for teacher, name in zip(self.teachers, self.names)
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
        return [getattr(teacher, "fingerprint", None) for teacher in self.teachers]

    def check_rows(self, rows: int) -> None:
        """Refuse precomputed-logit teachers whose row count differs from the data's."""
        for teacher, name in zip(self.teachers, self.names):
            count = getattr(teacher, "num_rows", None)
            if getattr(teacher, "uses_row_index", False) and count is not None and count != rows:
                raise UsageError(
                    f"teacher {name} holds {count} rows but the data has {rows}; row i of a "
                    "logits file must be row i of the data it is used with"
                )

    def check_data(self, source: Any) -> None:
        """``check_rows`` for ``source``, and refuse a row-indexed teacher that names the
        data fingerprint it was made from (``data_fingerprint``, e.g. a ``store:`` teacher)
        when ``source`` has another one."""
        self.check_rows(len(source))
        fingerprint = source.fingerprint
        for teacher, name in zip(self.teachers, self.names):
            made_from = getattr(teacher, "data_fingerprint", None)
            if made_from and fingerprint and made_from != fingerprint:
                raise UsageError(
                    f"teacher {name} holds outputs for other data (fingerprint {made_from}, "
                    f"this data {fingerprint}); use it with the data it was cached from, or "
                    "add force=true to its spec to use it anyway"
                )

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
        for k, (teacher, name, columns, temperature) in enumerate(
            zip(self.teachers, self.names, self.index, self.temperatures)
        ):
            z = self._run(teacher, name, x, index)
            wanted = C if columns is None else len(teacher.classes)  # columns: it has classes
            if z.dim() != 2 or z.shape[0] != B or z.shape[1] != wanted:
                raise UsageError(self._shape_error(name, tuple(z.shape), B, wanted, columns))
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
            z = z.clamp_min(IMPOSSIBLE)
            if temperature != 1.0:
                z = apply_temperature(z, temperature)
            if columns is None:
                out[k] = z
            else:
                have = columns >= 0
                out[k][:, have.to(x.device)] = z[:, columns[have].to(x.device)]
        self.batches_seen += 1
        return TeacherOutputs(out, self.known.to(x.device), bad if bad.any() else None)

    def _run(
        self, teacher: Any, name: str, x: torch.Tensor, index: torch.Tensor | None
    ) -> torch.Tensor:
        """One teacher on ``x``: a bug in it is a PluginError naming its plugin and the
        batch; rows it refuses (BadRowsError) are named as data rows."""
        row_index = getattr(teacher, "uses_row_index", False)
        if row_index and index is None:
            raise UsageError(f"teacher {name} needs row indices, which this run lacks")
        try:
            with running(teacher, f"teacher {name!r}", f" on batch {self.batches_seen}"):
                z = teacher(x, index) if row_index else teacher(x)
                return torch.as_tensor(z).to(device=x.device, dtype=torch.float32)
        except BadRowsError as exc:
            if index is None:
                raise
            raise exc.in_data(index.tolist()) from None

    def _shape_error(
        self, name: str, shape: tuple, rows: int, wanted: int, columns: torch.Tensor | None
    ) -> str:
        if len(shape) != 2 or shape[0] != rows:
            return f"teacher {name} returned shape {shape}, expected [{rows}, classes]"
        if columns is None:
            return (
                f"teacher {name} predicts {shape[1]} classes but the data has {wanted} "
                f"{self.classes[:20]}; give the teacher class names (classes=a;b;...) or "
                "use data with the same classes"
            )
        return f"teacher {name} returned {shape[1]} logits but names {wanted} classes"


def create_teachers(specs: Sequence[str | Spec]) -> list[Any]:
    """Build each teacher from its spec through the plugins (fails on the first bad one)."""
    from kdplug.plugins import create

    return [create("teachers", spec) for spec in specs]


def build_teacher_set(
    specs: Sequence[str | Spec],
    classes: Sequence[str],
    calibration: str | None = None,
    skip_bad_rows: bool = False,
) -> TeacherSet:
    """Build every teacher from its spec (a user's text or an engine's ``Spec.of``) through
    the plugins into one TeacherSet; each teacher is named by its spec's text."""
    teachers = create_teachers(specs)
    names = [str(spec) for spec in specs]
    temperatures = None
    if calibration:
        temperatures = load_temperatures(
            calibration, names, [getattr(teacher, "fingerprint", None) for teacher in teachers]
        )
    return TeacherSet(teachers, names, classes, temperatures, skip_bad_rows)
