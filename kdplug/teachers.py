"""The teacher set: K teachers on one batch, aligned to the run's label space.

Each teacher is a ``kdplug.components.Teacher`` (``teacher(x) -> logits [B, C_t]``, optional
``classes``, ``fingerprint``, ``uses_row_index``, ``num_rows``, ``data_fingerprint``); the
``TeacherSet`` is the live teachers' ``kdplug.components.Producer``. Probability outputs
are passed as log-probabilities (``log p``, exact zeros as ``ops.IMPOSSIBLE``), so a
temperature never moves mass onto a class with probability 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdplug.calibration import apply_temperature, load_temperatures
from kdplug.errors import BadRowsError, UntrustedTypes, UsageError, running
from kdplug.ops import IMPOSSIBLE
from kdplug.spec import Spec
from kdplug.teacher_checks import class_notes
from kdplug.teacher_io import NOT_GIVEN
from kdplug.teacher_names import NAME_OPTION, as_spec, teacher_names

log = logging.getLogger("kdplug")

__all__ = [
    "TeacherOutputs",
    "TeacherSet",
    "alignment",
    "build_teacher_set",
    "classes_from_teachers",
    "run_classes",
    "create_teachers",
    "feed_teachers",
    "load_temperatures",
]


@dataclass
class TeacherOutputs:
    """What any producer of teacher outputs (live teachers, the store) hands downstream."""

    logits: torch.Tensor  # [K, B, C] float32, aligned to the run's classes
    known: torch.Tensor  # [K, C] bool: teacher k can predict class c
    bad_rows: torch.Tensor | None = None  # [B] bool: some teacher gave NaN/Inf (skipped)
    # one teacher's features [B, C_i, H_i, W_i] per stage, after ``request_features``
    features: list[torch.Tensor] | None = None


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
    ``data``: the rows the teachers will see, which teachers with no normalization of their
    own are fed like (``feed_teachers``); ``inputs`` then says what each teacher is fed, and
    ``class_notes`` flags the named teachers that lack run classes
    (``kdplug.teacher_checks``).
    """

    def __init__(
        self,
        teachers: Sequence[Any],
        specs: Sequence[str | Spec],
        classes: Sequence[str],
        temperatures: Sequence[float] | None = None,
        skip_bad_rows: bool = False,
        data: Any = None,
    ):
        if not teachers:
            raise UsageError("no teacher given (use --teacher SPEC)")
        self.teachers = list(teachers)
        self.specs = [str(spec) for spec in specs]
        self.names = teacher_names(specs, teachers)
        self.classes = list(classes)
        refuse_duplicates(self.classes, "the run's classes (--classes, else the data's)")
        self.temperatures = list(temperatures) if temperatures else [1.0] * len(self.teachers)
        self.skip_bad_rows = skip_bad_rows
        self.index = [
            alignment(getattr(teacher, "classes", None), self.classes, spec)
            for teacher, spec in zip(self.teachers, self.specs)
        ]
        C = len(self.classes)
        self.known = torch.stack(
            [torch.ones(C, dtype=torch.bool) if i is None else i >= 0 for i in self.index]
        )
        self.columns = [None if i is None else _columns(i) for i in self.index]
        self.batches_seen = 0
        self.feature_teacher: int | None = None  # request_features: whose, at which stages
        self.feature_stages: list[int] = []
        own = [getattr(teacher, "classes", None) for teacher in self.teachers]
        self.class_notes = class_notes(self.names, own, self.classes)
        self.inputs = feed_teachers(self.teachers, self.names, data)

    @property
    def named(self) -> list[bool]:
        """Whether each teacher names its classes (aligned by name, else by position)."""
        return [index is not None for index in self.index]

    def __len__(self) -> int:
        return len(self.teachers)

    def to(self, device: torch.device | str) -> TeacherSet:
        """Move the teachers, and the class-alignment indexes every batch uses, to ``device``."""
        for teacher in self.teachers:
            if isinstance(teacher, torch.nn.Module):
                teacher.to(device)
                teacher.eval()
        self.known = self.known.to(device)
        self.columns = [None if c is None else tuple(t.to(device) for t in c) for c in self.columns]
        return self

    @property
    def reads_inputs(self) -> bool:
        """Whether any teacher reads ``x`` (else all are precomputed: ``uses_inputs = False``)."""
        return any(getattr(teacher, "uses_inputs", True) for teacher in self.teachers)

    def fingerprints(self) -> list[str | None]:
        return [getattr(teacher, "fingerprint", None) for teacher in self.teachers]

    def request_features(self, name: str | None, stages: Sequence[int]) -> str:
        """Every later output carries the features at ``stages`` of the teacher ``name``
        (None: the first with ``intermediates``); returns its name. A teacher without
        ``intermediates``, or no such teacher, is refused with the teachers that have them."""
        offer = [callable(getattr(teacher, "intermediates", None)) for teacher in self.teachers]
        having = [n for n, has in zip(self.names, offer) if has]
        if name is None and having:
            name = having[0]
        if name is None or name not in self.names or not offer[self.names.index(name)]:
            which = "no teacher offers" if name is None else f"teacher {name!r} offers no"
            offered = ", ".join(having) or "none of them (timm: and kdplug: teachers do)"
            raise UsageError(
                f"{which} intermediate features; teachers that do: {offered} "
                f"(the run's teachers: {', '.join(self.names)})"
            )
        self.feature_teacher, self.feature_stages = self.names.index(name), list(stages)
        return name

    def check_rows(self, rows: int) -> None:
        """Refuse precomputed-logit teachers whose row count differs from the data's."""
        for teacher, name in zip(self.teachers, self.specs):
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
        for teacher, name in zip(self.teachers, self.specs):
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
        shape = (len(self.teachers), B, C)
        if all(columns is None for columns in self.columns):  # every teacher fills its row
            out = torch.empty(shape, dtype=torch.float32, device=x.device)
        else:
            out = torch.full(shape, IMPOSSIBLE, dtype=torch.float32, device=x.device)
        row_sums = torch.zeros((len(self.teachers), B), dtype=torch.float32, device=x.device)
        raw = []  # each teacher's own logits, for the exact check in the rare bad batch
        features = None
        for k, (teacher, name, columns, temperature) in enumerate(
            zip(self.teachers, self.specs, self.index, self.temperatures)
        ):
            if k == self.feature_teacher:
                z, features = self._run(teacher, name, x, index, self.feature_stages)
            else:
                z = self._run(teacher, name, x, index)
            wanted = C if columns is None else len(teacher.classes)  # columns: it has classes
            if z.dim() != 2 or z.shape[0] != B or z.shape[1] != wanted:
                raise UsageError(self._shape_error(name, tuple(z.shape), B, wanted, columns))
            row_sums[k] = z.sum(1)  # not finite wherever a row holds NaN or Inf
            raw.append(z)
            if self.columns[k] is None and temperature == 1.0:  # straight into the batch
                torch.clamp_min(self._finite(z), IMPOSSIBLE, out=out[k])
                continue
            z = self._finite(z).clamp_min(IMPOSSIBLE)
            if temperature != 1.0:
                z = apply_temperature(z, temperature)
            if self.columns[k] is None:
                out[k] = z
            else:
                ours, theirs = self.columns[k]
                out[k].index_copy_(1, ours, z.index_select(1, theirs))
        self.batches_seen += 1
        if torch.isfinite(row_sums).all():  # the batch's one wait for the device: no bad row
            return TeacherOutputs(out, self.known_on(x.device), None, features)
        nonfinite = torch.stack([nonfinite_rows(z) for z in raw])  # exact, where a sum is not
        bad = nonfinite.any(0)
        if not bad.any():  # finite rows whose float32 sums overflow
            return TeacherOutputs(out, self.known_on(x.device), None, features)
        if not self.skip_bad_rows:
            k = int(nonfinite.any(1).nonzero()[0])
            rows = nonfinite[k].nonzero().flatten()[:5].tolist()
            raise UsageError(
                f"teacher {self.specs[k]} returned NaN or Inf logits in batch "
                f"{self.batches_seen - 1} (rows {rows} of the batch); pass "
                "--skip-bad-rows to drop such rows and count them"
            )
        return TeacherOutputs(out, self.known_on(x.device), bad, features)

    def _finite(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` with NaN and +Inf as 0 and -Inf as IMPOSSIBLE where bad rows are skipped (and
        must not spoil the batch's other rows); as it is otherwise, since a NaN/Inf row then
        stops the run before anything reads it."""
        if not self.skip_bad_rows:
            return z
        return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=IMPOSSIBLE)

    def known_on(self, device: torch.device) -> torch.Tensor:
        """``known`` on ``device`` (moved by ``to``, so copied only for another device)."""
        return self.known if self.known.device == device else self.known.to(device)

    def _run(
        self,
        teacher: Any,
        name: str,
        x: torch.Tensor,
        index: torch.Tensor | None,
        stages: list[int] | None = None,
    ) -> Any:
        """One teacher on ``x``: its logits, or with ``stages`` ``(logits, features)`` from
        its ``intermediates``. A bug in it is a PluginError naming its plugin and the batch;
        rows it refuses (BadRowsError) are named as data rows."""
        row_index = getattr(teacher, "uses_row_index", False)
        if row_index and index is None:
            raise UsageError(f"teacher {name} needs row indices, which this run lacks")
        try:
            with running(teacher, f"teacher {name!r}", f" on batch {self.batches_seen}"):
                if stages is not None:
                    z, features = teacher.intermediates(x, stages)
                else:
                    z = teacher(x, index) if row_index else teacher(x)
                z = torch.as_tensor(z).to(device=x.device, dtype=torch.float32)
                return z if stages is None else (z, [f.float() for f in features])
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


def nonfinite_rows(z: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the rows of ``z [B, C]`` holding NaN or Inf, without a host sync.

    ``z * 0`` is NaN exactly where ``z`` is NaN or infinite and 0 elsewhere, so its row
    sums are NaN exactly for those rows and never overflow: two float32 passes, about 6x
    faster on the CPU than a float64 sum and 4x faster than ``isfinite().all(1)``.
    ``TeacherSet`` calls it only for a batch where some row's plain sum is not finite (a
    row with NaN or Inf always has one; a finite row has one only when it overflows)."""
    return torch.mul(z, 0.0).sum(1).isnan()


def _columns(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(run columns, the teacher's columns)`` of the classes a teacher has, from its
    alignment index (``alignment``: the teacher's column per run class, -1 where it lacks it)."""
    have = index >= 0
    return have.nonzero().flatten(), index[have]


def create_teachers(specs: Sequence[str | Spec]) -> list[Any]:
    """Build each teacher from its spec through the plugins, ``name=`` taken off
    (``kdplug.teacher_names``). Fails on the first bad one, except that files needing
    untrusted types are all listed in one error. The files the specs name are hashed side by
    side in the background from the start (``hash_in_background``): a factory that takes its
    file's fingerprint waits for that file only."""
    from kdplug.file_hashes import hash_in_background
    from kdplug.outputs import input_paths
    from kdplug.plugins import create

    hash_in_background(input_paths(map(str, specs)))
    teachers, untrusted = [], []
    for spec in specs:
        try:
            teachers.append(create("teachers", as_spec(spec).without(NAME_OPTION)))
        except UntrustedTypes as exc:
            untrusted.append(exc)
    if len(untrusted) == 1:
        raise untrusted[0]
    if untrusted:
        listed = "; ".join(f"{exc.source} needs {exc.types}" for exc in untrusted)
        raise UsageError(
            f"{len(untrusted)} teacher files need types skops does not trust by default: "
            f"{listed}; if you trust them add trusted=TYPE;TYPE... to each spec (or pass "
            "--allow-pickle to trust every type in the files)"
        )
    return teachers


def build_teacher_set(
    specs: Sequence[str | Spec],
    classes: Sequence[str],
    calibration: str | None = None,
    skip_bad_rows: bool = False,
    data: Any = None,
    teachers: Sequence[Any] | None = None,
) -> TeacherSet:
    """Build every teacher from its spec (a user's text or an engine's ``Spec.of``) through
    the plugins into one TeacherSet (``teachers``: already built from ``specs``); a
    calibration file's temperatures are found by spec text; ``data`` as in TeacherSet."""
    teachers = create_teachers(specs) if teachers is None else list(teachers)
    temperatures = None
    if calibration:
        temperatures = load_temperatures(
            calibration,
            [str(spec) for spec in specs],
            [getattr(teacher, "fingerprint", None) for teacher in teachers],
        )
    return TeacherSet(teachers, specs, classes, temperatures, skip_bad_rows, data)


def feed_teachers(teachers: Sequence[Any], names: Sequence[str], data: Any) -> list[Any]:
    """Give each teacher with no normalization of its own (``normalize_like_data``) the
    per-channel mean and std of the image rows ``data`` (a ``kdplug.data.DataSource``),
    measured as ``distill`` measures a student's (``kdplug.preprocess.data_normalization``);
    log one line per teacher that says what it is fed (``inputs``). Returns each
    teacher's ``inputs`` (None where it says nothing), JSON-ready."""
    wanting = [
        teacher for teacher in teachers if getattr(teacher, "normalize_like_data", None) is not None
    ]
    if wanting and data is not None and data.kind == "image":
        from kdplug.preprocess import STATS_ROWS, data_normalization

        mean, std = data_normalization(data)
        where = f"measured on {min(len(data), STATS_ROWS)} rows of {data.spec}"
        for teacher in wanting:
            teacher.normalize_like_data(mean, std, where)
    fed = []
    for teacher, name in zip(teachers, names):
        inputs = getattr(teacher, "inputs", None)
        if inputs is not None and data is not None and data.kind != "image":
            inputs = None  # feature rows reach a model as they are: nothing to resize
        if inputs is not None:
            inputs = {**inputs, "from": dict(inputs["from"])}
            if inputs["size"] is None and data is not None and data.kind == "image":
                inputs["size"] = list(data.input_shape[1:])
                inputs["from"]["size"] = "the data's own, no resize"
            log.info("%s", describe_inputs(name, inputs, data))
        fed.append(inputs)
    return fed


def describe_inputs(name: str, inputs: Any, data: Any) -> str:
    """One line: the size, mean and std teacher ``name`` is fed, where each came from, and
    how to change them."""
    where = inputs["from"]
    size = "x".join(map(str, inputs["size"])) if inputs["size"] else "the data's own size"
    channels = ""
    if data is not None and data.kind == "image" and inputs.get("in_chans"):
        if data.in_chans == 1 and inputs["in_chans"] > 1:
            channels = f", grayscale repeated to {inputs['in_chans']} channels"
    mean, std = inputs["mean"], inputs["std"]
    if where["mean"] == where["std"] == NOT_GIVEN:
        fed = f"{size} images ({where['size']}{channels}), not normalized (no mean= or std= "
        fed += "given: pixels in [0, 1] as the data path decodes them)"
    elif where["size"] == where["mean"] == where["std"]:
        fed = f"{size} images{channels}, normalized with mean {mean} and std {std} (all: "
        fed += f"{where['size']})"
    elif where["mean"] == where["std"]:
        fed = f"{size} images ({where['size']}{channels}), normalized with mean {mean} and "
        fed += f"std {std} ({where['mean']})"
    else:
        fed = f"{size} images ({where['size']}{channels}), normalized with mean {mean} "
        fed += f"({where['mean']}) and std {std} ({where['std']})"
    return f"teacher {name} is fed {fed}; set size=, mean=, std= on its spec to change them"


def classes_from_teachers(teachers: Sequence[Any], names: Sequence[str]) -> list[str] | None:
    """The run's classes taken from teachers that all name theirs: their order when they
    name the same set, else their union in order of first appearance (logged, with how to
    choose). None when some teacher names none."""
    named = [getattr(teacher, "classes", None) for teacher in teachers]
    if not named or any(own is None for own in named):
        return None
    lists = [[str(c) for c in own] for own in named]
    union = list(dict.fromkeys(c for own in lists for c in own))
    if all(set(own) == set(union) for own in lists):
        log.info(
            "classes from the teachers, which all name the same %d: %s (as %s orders them)",
            len(union),
            lists[0][:20],
            names[0],
        )
    else:
        log.warning(
            "classes from the teachers, which name different sets: their union of %d, in "
            "order of first appearance: %s; pass --classes a,b,c to choose",
            len(union),
            union[:20],
        )
    return union


def run_classes(
    given: Sequence[str] | None, data: Any, teachers: Sequence[Any], specs: Sequence[str | Spec]
) -> tuple[list[str], str]:
    """A run's class names and where they came from: ``given`` (``--classes``), else the
    data's (``data``: a ``kdplug.data.DataSource``), else the teachers' when every one names
    its classes (``classes_from_teachers``); else one line saying what to pass."""
    if given:
        return list(given), "--classes"
    if data.classes:
        return list(data.classes), "data"
    names = [str(spec) for spec in specs]
    from_teachers = classes_from_teachers(teachers, names)
    if from_teachers:
        return from_teachers, "teachers"
    unnamed = [
        name for name, teacher in zip(names, teachers) if getattr(teacher, "classes", None) is None
    ]
    raise UsageError(
        f"{data.spec} has no label column to take class names from (columns: {data.columns}), "
        f"and teacher {unnamed[0]} names no classes; pass --classes a,b,c (in the unnamed "
        "teachers' output order), or give each teacher classes=a;b;c"
    )
