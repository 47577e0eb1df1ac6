"""The training engine: distill K teachers into a student, or train it on labels alone.

Per batch ``(x, y, idx)`` of the train rows (then the unlabeled rows, label -1):

    producer(x, idx) -> TeacherOutputs -> combiner -> target [B, C] at the loss's T
    total = ce_weight * CE(student, labels of labeled rows) + kd_weight * loss(student, target)
            (+ loss.consistency(...) on the unlabeled rows' weak and strong views,
             + loss.feature_loss(...) on the student's and a teacher's features)

The producer is any callable ``producer(x, idx) -> TeacherOutputs`` with ``names`` and
``fingerprints()``: the live teachers (``kdplug.teachers.TeacherSet``) or a teacher store,
whose ``rebuild_views(x, idx, epoch) -> x`` rebuilds each row's view of the epoch in the
training loader's workers (``set_epoch`` tells it which epoch's outputs to serve).
``Trainer`` holds the per-step code; ``distill`` the epochs, files and resume. Only the main
process writes files (``distributed.is_main``). Under torch.distributed (``kdplug.distributed``)
the student runs in DistributedDataParallel, each rank trains on its own share of each
epoch's rows (``--batch-size`` rows per rank and step) and the epoch's sums are reduced
over the ranks; the checkpoint holds the unwrapped student, so it resumes on any number
of ranks.

Files in ``out``: run.json (config), checkpoint.pt (written atomically each epoch end),
metrics.jsonl (one line per epoch), student/ (kdplug.model_dir), summary.json, curves.png.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdplug import distributed, teacher_checks
from kdplug.data import (
    DataSource,
    EpochBatches,
    EpochLoader,
    batch_count,
    batches,
    epoch_loader,
    load_data,
    shuffled,
)
from kdplug.device import autocast, full_precision, grad_scaler, memory_format
from kdplug.errors import PluginError, UsageError, component_name, running
from kdplug.fitting import combined_prediction, invalid_rows
from kdplug.ops import standardize
from kdplug.outputs import discarding_unstarted_runs
from kdplug.preprocess import Preprocess, data_normalization
from kdplug.spec import Spec, parse_spec

log = logging.getLogger("kdplug")
progress_log = logging.getLogger("kdplug.progress")  # kdplug.progress's: the demo shows it

MARKER = "run.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
STUDENT = "student"
CURVES = "curves.png"
OPTIMIZER = "adamw"
WEIGHT_DECAY = 0.05
SCHEDULER = "cosine"
EMA_DECAY = 0.999
VAL_CACHE_BYTES = 256 * 2**20  # val data up to this size is decoded once and kept
# timm's schedulers that step per update on their own (plateau needs a metric per epoch)
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "rsqrt")
CLIP_MODES = ("norm", "value", "agc")  # timm.utils.dispatch_clip_grad
FLOATS = (
    "lr",
    "weight_decay",
    "momentum",
    "warmup_lr",
    "min_lr",
    "decay_epochs",
    "decay_rate",
    "clip_grad",
    "label_smoothing",
)
INTS = ("epochs", "batch_size", "seed", "workers", "warmup_epochs", "log_interval")
# the optimizer and schedule options (kdplug.cli.training's flags), which self-train passes on
TRAINING = (
    "opt",
    "weight_decay",
    "momentum",
    "sched",
    "warmup_epochs",
    "warmup_lr",
    "min_lr",
    "decay_epochs",
    "decay_milestones",
    "decay_rate",
    "clip_grad",
    "clip_mode",
    "label_smoothing",
)
NUMBERS = {**dict.fromkeys(INTS, int), **dict.fromkeys(FLOATS, float)}


@dataclass
class DistillConfig:
    """Everything a distill run is made of; the keys of ``--config FILE.yaml``."""

    student: str | Spec = ""
    train: str = ""
    out: str = ""
    # components: spec text as a user writes it, or a Spec an engine built (Spec.of)
    teachers: list[str | Spec] = field(default_factory=list)
    store: str | None = None  # a teacher store (kdplug cache) instead of live teachers
    unlabeled: str | Spec | None = None
    val: str | None = None
    loss: str | Spec = "kd"
    combiner: str | Spec = "auto"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    device: str = "auto"
    seed: int = 0
    calibration: str | None = None
    # labeled rows held out from the teachers' training: auto and T=auto fit on them
    calibration_data: str | None = None
    keep: str = "best"
    ema: bool = False
    augment: str | None = None
    compile: bool = False
    skip_bad_rows: bool = False
    workers: int | None = None
    # the optimizer and schedule: timm's create_optimizer_v2 / create_scheduler_v2 options
    opt: str = OPTIMIZER
    weight_decay: float = WEIGHT_DECAY
    momentum: float = 0.9
    sched: str = SCHEDULER
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    decay_epochs: float | None = None  # step, wsd, rsqrt: None is timm's default
    decay_milestones: list[float] | None = None  # multistep: epochs of each decay
    decay_rate: float = 0.1
    clip_grad: float | None = None  # timm.utils.dispatch_clip_grad, after unscaling
    clip_mode: str = "norm"
    label_smoothing: float = 0.0  # of the hard-label CE term (the engine's)
    log_interval: int = 50  # steps between progress lines (kdplug.progress)
    tensorboard: str | None = None  # a directory for the tensorboard plugin's event files
    resume: bool = False
    overwrite: bool = False

    # how a run is run, not what it computes: free to change on --resume
    RUNTIME = ("device", "workers", "log_interval", "tensorboard", "resume", "overwrite")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "config") -> DistillConfig:
        """Build from a dict with flag-style keys (``batch-size``, ``teacher``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        aliases = {"teacher": "teachers"}
        given: dict[str, Any] = {}
        for key, value in values.items():
            name = aliases.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
            if name not in names:
                known = ", ".join(sorted(n.replace("_", "-") for n in names))
                raise UsageError(f"{source}: unknown key {key!r} (known: {known})")
            if name in NUMBERS and isinstance(value, str):  # YAML reads 3e-3 as a string
                try:
                    value = NUMBERS[name](value)
                except ValueError:
                    pass  # validate() names the key
            given[name] = value
        if isinstance(given.get("teachers"), str):
            given["teachers"] = [given["teachers"]]
        if given.get("augment") is True:
            given["augment"] = "default"
        elif given.get("augment") is False:
            given["augment"] = None
        config = cls(**given)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Refuse missing or out-of-range values with one sentence naming the key."""
        for key in ("student", "train", "out"):
            if not isinstance(getattr(self, key), str | Spec) or not getattr(self, key):
                raise UsageError(f"{source}: --{key} is required")
        if not isinstance(self.teachers, list | tuple) or not all(
            isinstance(t, Spec) or (isinstance(t, str) and t) for t in self.teachers
        ):
            raise UsageError(f"{source}: teachers must be a list of spec strings")
        self.teachers = list(self.teachers)
        _check_int(source, "epochs", self.epochs, 1)
        _check_int(source, "batch-size", self.batch_size, 1)
        _check_int(source, "seed", self.seed, 0)
        if self.workers is not None:
            _check_int(source, "workers", self.workers, 0)
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float):
            raise UsageError(f"{source}: lr must be a number, got {self.lr!r}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise UsageError(f"{source}: lr must be > 0, got {self.lr}")
        if self.keep not in ("best", "last"):
            raise UsageError(f"{source}: keep must be best or last, got {self.keep!r}")
        self.validate_training(source)
        for key in ("ema", "compile", "skip_bad_rows", "resume", "overwrite"):
            if not isinstance(getattr(self, key), bool):
                raise UsageError(f"{source}: {key} must be true or false")
        keys = ("unlabeled", "val", "calibration", "augment", "loss", "combiner", "device", "store")
        for key in (*keys, "calibration_data"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str | Spec):
                raise UsageError(f"{source}: {key} must be a string, got {value!r}")

    def validate_training(self, source: str) -> None:
        """The optimizer, schedule, clipping, smoothing and progress options."""
        for key in ("weight_decay", "momentum", "warmup_lr", "min_lr", "decay_rate"):
            _check_number(source, key, getattr(self, key), 0.0)
        for key in ("decay_epochs", "clip_grad"):
            if getattr(self, key) is not None:
                _check_number(source, key, getattr(self, key), 0.0, above=True)
        self.decay_milestones = milestones(source, self.decay_milestones)
        _check_int(source, "warmup-epochs", self.warmup_epochs, 0)
        _check_int(source, "log-interval", self.log_interval, 1)
        _check_number(source, "label_smoothing", self.label_smoothing, 0.0)
        if self.label_smoothing >= 1:
            raise UsageError(f"{source}: label-smoothing must be < 1, got {self.label_smoothing}")
        if self.warmup_epochs >= self.epochs:
            raise UsageError(
                f"{source}: warmup-epochs ({self.warmup_epochs}) must be fewer than epochs "
                f"({self.epochs})"
            )
        for key in ("opt", "sched", "clip_mode"):  # timm's names are lower case
            if isinstance(getattr(self, key), str):
                setattr(self, key, getattr(self, key).lower())
        _check_choice(source, "sched", self.sched, SCHEDULERS)
        _check_choice(source, "clip-mode", self.clip_mode, CLIP_MODES)
        _check_choice(source, "opt", self.opt, timm_optimizers(self.opt))
        if self.tensorboard is not None:
            if not isinstance(self.tensorboard, str) or not self.tensorboard:
                raise UsageError(f"{source}: tensorboard must be a directory")
            from kdplug.run import check_tensorboard

            check_tensorboard()

    def record(self) -> dict[str, Any]:
        """What identifies the run (stored in run.json; ``--resume`` must match it); a
        component is recorded as its spec text."""
        values = {f.name: written(getattr(self, f.name)) for f in dataclasses.fields(self)}
        values["teachers"] = [str(spec) for spec in self.teachers]
        return {k: v for k, v in values.items() if k not in self.RUNTIME}


def written(value: Any) -> Any:
    """A config value as run.json keeps it: a Spec as its text."""
    return str(value) if isinstance(value, Spec) else value


def milestones(source: str, value: Any) -> list[float] | None:
    """``--decay-milestones``: increasing epochs > 0, given as a list or as ``"150,180"``."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        epochs = [float(item) for item in items if not isinstance(item, bool)]
    except (TypeError, ValueError):
        epochs = []
    if (
        not epochs
        or len(epochs) != len(items)
        or any(not math.isfinite(e) or e <= 0 for e in epochs)
        or epochs != sorted(set(epochs))
    ):
        raise UsageError(
            f"{source}: decay-milestones must be increasing epochs > 0 like 150,180,210, "
            f"got {value!r}"
        )
    return epochs


def _check_int(source: str, key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{source}: {key} must be an integer >= {low}, got {value!r}")


def _check_number(source: str, key: str, value: Any, low: float, above: bool = False) -> None:
    """A finite number >= ``low`` (> ``low`` when ``above``)."""
    flag = key.replace("_", "-")
    bound = f"> {low:g}" if above else f">= {low:g}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{source}: {flag} must be a number {bound}, got {value!r}")
    if value < low or (above and value == low):
        raise UsageError(f"{source}: {flag} must be {bound}, got {value}")


def _check_choice(source: str, key: str, value: Any, choices: Any) -> None:
    """``value`` is one of ``choices``, else one line with the nearest one."""
    from kdplug.registry import closest

    if isinstance(value, str) and value in choices:
        return
    close = closest(str(value), choices)
    hint = f"did you mean {close!r}? " if close else ""
    shown = (
        f"known: {', '.join(choices)}" if len(choices) <= 12 else "see timm.optim.list_optimizers()"
    )
    raise UsageError(f"{source}: unknown {key} {value!r} ({hint}{shown})")


def timm_optimizers(opt: Any) -> list[str]:
    """The ``--opt`` names timm's factory takes: its optimizers, also as ``lookahead_NAME``
    (the one prefix it knows), listed for ``opt``'s own prefix."""
    from timm.optim import list_optimizers

    names = list(list_optimizers())
    if isinstance(opt, str) and opt.startswith("lookahead_"):
        return [f"lookahead_{name}" for name in names]
    return names


class TrainRows:
    """The train rows, then the unlabeled rows (label -1), as one source for ``batches``.

    Row ``i < len(train)`` is train row ``i``; row ``len(train) + j`` is unlabeled row ``j``.
    """

    def __init__(self, train: DataSource, unlabeled: DataSource | None):
        self.train, self.unlabeled = train, unlabeled
        self.split = len(train)

    def __len__(self) -> int:
        return self.split + (len(self.unlabeled) if self.unlabeled is not None else 0)

    def labels(self) -> np.ndarray:
        """``[N]`` int64: the train rows' labels, then -1 for every unlabeled row."""
        extra = len(self) - self.split
        return np.concatenate([self.train.labels(), np.full(extra, -1, dtype=np.int64)])

    def batch(
        self, indices: list[int], augment: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` float32 ``[B, C, H, W]`` (``[B, 2, C, H, W]`` with ``TwoViews``), ``y``
        int64 ``[B]``, ``idx`` int64 ``[B]`` (``augment``: see ``DataSource.batch``)."""
        idx = torch.tensor(indices, dtype=torch.int64)
        is_train = idx < self.split
        if is_train.all():  # no unlabeled rows in the batch: the train rows as they come
            return self.train.batch(indices, augment)
        xu, _, _ = self.unlabeled.batch((idx[~is_train] - self.split).tolist(), augment)
        x = torch.empty((len(idx), *xu.shape[1:]), dtype=torch.float32)  # two views: [B, 2, ...]
        y = torch.full((len(idx),), -1, dtype=torch.int64)
        x[~is_train] = xu
        if is_train.any():
            xt, yt, _ = self.train.batch(idx[is_train].tolist(), augment)
            x[is_train], y[is_train] = xt, yt
        return x, y, idx


@dataclass
class Parts:
    """What ``distill`` builds from the config before it writes anything."""

    train: DataSource
    unlabeled: DataSource | None
    val: DataSource | None
    classes: list[str]
    model: torch.nn.Module
    architecture: str
    mean: list[float] | None  # the images' per-channel normalization; None: tabular
    std: list[float] | None
    loss: Any
    combiner: Any
    producer: Any
    augment: tuple[Any, Any] | None
    calibration_data: DataSource | None = None  # the rows fits use instead of --train's
    student_name: str = "timm"  # the student's component (a spec's NAME), which rebuilds it


def build_parts(config: DistillConfig, producer: Any = None) -> Parts:
    """Load the data and build the student, loss, combiner and teachers (or refuse)."""
    from kdplug.augment import parse_augment
    from kdplug.plugins import create
    from kdplug.teachers import build_teacher_set

    augment = parse_augment(config.augment)
    loss = create("losses", config.loss)
    combiner = create("combiners", config.combiner) if loss.uses_teachers else None
    if loss.uses_teachers and producer is None and not config.teachers and not config.store:
        raise UsageError(
            f"loss {config.loss} distills from teachers: give --teacher SPEC or --store STORE "
            "(or --loss ce to train on the labels alone)"
        )
    if config.store:
        check_store_options(config)
    learns_unlabeled = loss.uses_teachers or getattr(loss, "strong_augment", None) is not None
    for key, flag, used in (
        ("unlabeled", "--unlabeled", learns_unlabeled),
        ("calibration_data", "--calibration-data", loss.uses_teachers),
    ):
        if not used and getattr(config, key):
            raise UsageError(f"loss {config.loss} uses labels only: {flag} rows would be unused")

    train = load_data(config.train)
    check_augment(config.augment, train)
    check_strong_views(loss, config.loss, augment, train)
    if train.classes is None:
        raise UsageError(
            f"--train {config.train}: no label column (it needs labels; columns: {train.columns})"
        )
    classes = list(train.classes)
    if not (train.labels() >= 0).any():
        raise UsageError(f"--train {config.train}: no labeled rows (all labels are missing)")
    unlabeled = load_data(config.unlabeled) if config.unlabeled else None
    if unlabeled is not None:
        check_like_train(unlabeled, train, "--unlabeled")
    val = load_data(config.val, classes=classes) if config.val else None
    if val is not None:
        check_like_train(val, train, "--val")
        if not (val.labels() >= 0).any():
            raise UsageError(f"--val {config.val}: no rows labeled with the train classes")

    # the student before the teachers, so its initial weights depend on the seed alone
    spec = parse_spec(config.student) if isinstance(config.student, str) else config.student
    model = build_student(spec, classes, train)
    mean, std = student_normalization(model, train)
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture") or spec.ref
    if loss.uses_teachers and producer is None and config.store:
        from kdplug.store.producer import store_producer

        producer = store_producer(config.store, train, unlabeled, classes, config.seed)
    if loss.uses_teachers and producer is None:
        producer = build_teacher_set(
            config.teachers, classes, config.calibration, config.skip_bad_rows, data=train
        )
    if not loss.uses_teachers and config.teachers:
        log.warning("loss %s uses no teachers; the --teacher specs are not run", config.loss)
    calibration = (
        fit_rows_source(config, classes, train, producer) if producer is not None else None
    )

    return Parts(
        train=train,
        unlabeled=unlabeled,
        val=val,
        classes=classes,
        model=model,
        architecture=architecture,
        mean=mean,
        std=std,
        student_name=spec.name,
        loss=loss,
        combiner=combiner,
        producer=producer,
        augment=augment,
        calibration_data=calibration,
    )


def fit_rows_source(
    config: DistillConfig, classes: list[str], train: DataSource, producer: Any
) -> DataSource | None:
    """``--calibration-data``: labeled images of --train's shape (``kdplug.fitting``)."""
    if not config.calibration_data:
        return None
    from kdplug.fitting import calibration_rows

    rows = calibration_rows(config.calibration_data, classes, producer, "--train and --unlabeled")
    check_like_train(rows, train, "--calibration-data")
    return rows


def check_augment(augment: str | None, train: DataSource) -> None:
    """``--augment`` transforms images: refused for tabular --train rows."""
    if augment is not None and train.kind == "tabular":
        raise UsageError(
            f"--augment {augment} transforms images; --train {train.spec} is tabular (a "
            "tabular student's noise is its own, e.g. tabular:mlp,dropout=0.2)"
        )


def check_strong_views(loss: Any, spec: Any, augment: Any, train: DataSource) -> None:
    """A consistency loss (``strong_augment``) augments images, row by row: refused for
    tabular rows and with mixup or cutmix (mixed rows have no view of their own)."""
    if getattr(loss, "strong_augment", None) is None:
        return
    if train.kind == "tabular":
        raise UsageError(
            f"--loss {spec} learns from strong views of images; --train {train.spec} is tabular"
        )
    if augment is not None and augment[1]:
        raise UsageError(
            f"--loss {spec} compares each row's weak and strong views; --augment's mixup or "
            "cutmix mixes rows (leave them out of --augment)"
        )


def check_like_train(rows: DataSource, train: DataSource, flag: str) -> None:
    """``flag``'s rows are of --train's kind and shape: images of its ``[C, H, W]``, or
    feature rows with as many features (named differently: said in the log)."""
    if rows.kind != train.kind:
        held = {"image": "holds images", "tabular": "is tabular"}
        raise UsageError(
            f"{flag} {rows.spec} {held[rows.kind]} but --train {train.spec} {held[train.kind]}"
        )
    if train.kind == "image" and tuple(rows.input_shape) != tuple(train.input_shape):
        raise UsageError(
            f"{flag} images are {list(rows.input_shape)} but --train images are "
            f"{list(train.input_shape)} (use image_size=N on both data specs)"
        )
    if train.kind == "tabular" and len(rows.input_columns) != len(train.input_columns):
        raise UsageError(
            f"{flag} rows have {len(rows.input_columns)} features {rows.input_columns} but "
            f"--train rows have {len(train.input_columns)} {train.input_columns}"
        )
    if train.kind == "tabular" and rows.input_columns != train.input_columns:
        log.warning(
            "%s's features are named %s, --train's %s: they are matched by position",
            flag,
            rows.input_columns,
            train.input_columns,
        )


def build_student(spec: Spec, classes: list[str], train: DataSource) -> torch.nn.Module:
    """The student for ``train``'s rows: built with the class count and ``in_chans`` (the
    images' channels, or the feature count of tabular rows); refused unless it takes rows
    of the data's kind (its ``data_kind``)."""
    from kdplug.plugins import create

    if {"num_classes", "in_chans"} & set(spec.options):
        raise UsageError(f"--student {spec}: num_classes and in_chans come from the data")
    model = create("students", spec, len(classes), train.input_shape[0])
    kind = getattr(model, "data_kind", "image")
    if kind != train.kind:
        hint = "tabular:mlp" if train.kind == "tabular" else "timm:ARCH"
        raise UsageError(
            f"--student {spec.name}:{spec.ref} takes "
            f"{'images' if kind == 'image' else 'tabular rows'}; "
            f"--train {train.spec} is {'tabular' if train.kind == 'tabular' else 'images'} "
            f"(a student for it: --student {hint})"
        )
    return model


def student_normalization(
    model: torch.nn.Module, train: DataSource
) -> tuple[list[float] | None, list[float] | None]:
    """Images: the per-channel ``(mean, std)`` the student's inputs are normalized with (its
    own, else measured on --train). Tabular: ``(None, None)``, the student fitting its own
    on every --train row (``fit_inputs``)."""
    if train.kind == "image":
        normalization = getattr(model, "input_normalization", None)
        mean, std = normalization if normalization is not None else data_normalization(train)
        return list(mean), list(std)
    fit = getattr(model, "fit_inputs", None)
    if fit is not None:
        x = torch.cat([x for x, _, _ in batches(train, 4096, workers=0)])
        bad = (~torch.isfinite(x)).nonzero()
        if len(bad):
            row, column = bad[0].tolist()
            raise UsageError(
                f"--train {train.spec}: row {row} has a missing (NaN) or infinite value in "
                f"feature {train.input_columns[column]!r}; the student fits its feature "
                "normalization on finite rows"
            )
        with running(model, "the student"):
            fit(x)
    return None, None


def check_store_options(config: DistillConfig) -> None:
    """A store replaces the teachers, their calibration and the augmentation (its views)."""
    for key, flag in (("teachers", "--teacher"), ("calibration", "--calibration")):
        if getattr(config, key):
            raise UsageError(f"--store replaces {flag}: the store holds the teachers' outputs")
    if config.calibration_data:
        raise UsageError(
            "--calibration-data needs the live teachers: a store holds their outputs on the "
            "--train and --unlabeled rows only (give --teacher SPEC instead of --store)"
        )
    if config.augment is not None:
        raise UsageError(
            "--store trains on the store's own views; --augment would change the inputs the "
            "stored outputs belong to (cache with --views V --augment ... instead)"
        )


def _describe(source: DataSource | None, spec: str | Spec | None) -> dict[str, Any] | None:
    if source is None:
        return None
    return {
        "spec": written(spec),
        "fingerprint": source.fingerprint,
        "rows": len(source),
        "labeled_rows": int((source.labels() >= 0).sum()),
        "split": source.split,
    }


@dataclass
class TeacherTarget:
    """The teachers on one batch, as a step uses them: ``weights [K, B]``, ``target [B, C]``
    at the loss's T, ``bad [B]`` rows to drop (or None), ``prediction [B, C]`` the combined
    prediction at T = 1 (consistency losses, else None) and ``features`` (feature losses)."""

    weights: torch.Tensor
    target: torch.Tensor
    bad: torch.Tensor | None
    prediction: torch.Tensor | None
    features: list[torch.Tensor] | None

    def features_of(self, keep: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The teacher's features of the rows ``keep`` marks (all rows for None)."""
        if self.features is None or keep is None:
            return self.features
        return [f[keep] for f in self.features]


def student_features(
    parts: Parts, model: torch.nn.Module, normalize: Any, device: torch.device
) -> Any:
    """For a feature loss: the student with the loss's projector
    (``kdplug.features.StudentFeatures``), its shapes probed on the first train rows; None
    for any other loss."""
    if getattr(parts.loss, "feature_stages", None) is None:
        return None
    from kdplug.features import StudentFeatures, add_projector, check_feature_run

    teacher = check_feature_run(parts.loss, model, parts.producer, parts.architecture)
    log.info(
        "feature loss: the student's and teacher %s's features at stages %s",
        teacher,
        list(parts.loss.feature_stages),
    )
    features = StudentFeatures(model, parts.loss)
    rows = list(range(min(2, len(parts.train))))
    x, _, idx = parts.train.batch(rows)
    add_projector(features, parts.producer, (x.to(device), idx), normalize)
    return features


class Trainer:
    """The student, its optimizer, scheduler and EMA, and one training step.

    ``step(x, y, idx)`` takes a CPU batch (``x`` in [0, 1]) and returns the step's sums over
    its rows, as tensors left on the device (no host sync): ``loss``, ``ce``, ``kd``,
    ``bad_rows`` and ``weights`` ``[K]`` (each teacher's summed weight); and ``rows`` (int).
    """

    def __init__(
        self, parts: Parts, config: DistillConfig, device: torch.device, updates_per_epoch: int
    ):
        from timm.utils import ModelEmaV3

        self.device, self.cuda = device, device.type == "cuda"
        images = parts.train.kind == "image"  # feature rows [B, D] have no channels_last
        self.memory_format = memory_format(device) if images else torch.contiguous_format
        if self.cuda:  # fixed input sizes: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True
        self.model = parts.model.to(device, memory_format=self.memory_format)
        self.normalize = Preprocess(
            mean=parts.mean, std=parts.std, in_chans=parts.train.in_chans
        ).to(device)
        self.loss, self.combiner, self.producer = parts.loss, parts.combiner, parts.producer
        for teacher in getattr(parts.producer, "teachers", ()):
            if isinstance(teacher, torch.nn.Module):  # or autocast keeps a copy of each weight
                teacher.requires_grad_(False)
        self.features = student_features(parts, self.model, self.normalize, device)
        trained = self.features if self.features is not None else self.model
        self.trained = trained  # what the optimizer steps: the student (and a projector)
        forward = distributed.wrap_model(trained, device)
        self.forward = torch.compile(forward) if config.compile else forward
        self.optimizer = build_optimizer(trained, config)
        self.scheduler = build_scheduler(self.optimizer, config, updates_per_epoch)
        self.clip_grad, self.clip_mode = config.clip_grad, config.clip_mode
        self.label_smoothing = config.label_smoothing
        self.ema = ModelEmaV3(self.model, decay=EMA_DECAY, use_warmup=True) if config.ema else None
        self.scaler = grad_scaler(device)  # a pass-through unless autocast runs in float16
        self.mixup = None  # the per-image augmentation runs in the loader (train_loader)
        if parts.augment is not None and parts.augment[1]:
            from kdplug.augment import MixupLabels

            options = parts.augment[1]
            if self.label_smoothing and "label_smoothing" not in options:
                options = {**options, "label_smoothing": self.label_smoothing}
            self.mixup = MixupLabels(options, len(parts.classes))
        self.updates = 0
        self.invalid_targets = torch.zeros((), dtype=torch.long, device=device)
        self.strong = getattr(self.loss, "strong_augment", None) is not None
        if self.strong:  # each row's position among the unlabeled rows (-1: labeled)
            labels = TrainRows(parts.train, parts.unlabeled).labels()
            unlabeled = labels < 0
            position = np.full(len(labels), -1, dtype=np.int64)
            position[unlabeled] = np.arange(int(unlabeled.sum()))
            self.unlabeled_position = torch.from_numpy(position)
            if hasattr(self.loss, "set_unlabeled_rows"):
                with running(self.loss, "the loss"):
                    self.loss.set_unlabeled_rows(int(unlabeled.sum()))

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model to validate and save: the EMA when asked for, else the student."""
        return self.ema.module if self.ema is not None else self.model

    def teacher_target(
        self, x: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor
    ) -> TeacherTarget:
        """The teachers' weights, target and extras on the batch (``TeacherTarget``)."""
        with torch.inference_mode():
            out = self.producer(x, idx)  # under the step's autocast, as in label and cache
            logits = out.logits.float()
            prediction = None
            if self.strong:  # a consistency loss reads how sure the teachers are
                with running(self.combiner, "the combiner"), full_precision(x.device):
                    _, prediction = combined_prediction(self.combiner, logits, out.known, labels)
                prediction = prediction.float()
            if self.loss.standardize:
                logits = standardize(logits, out.known)
            # the combiner in float32, as where it was fitted (kdplug.fitting)
            with (
                running(self.combiner, "the combiner"),
                full_precision(x.device),
            ):
                weights, target = self.combiner(logits, out.known, labels, self.loss.temperature)
            target = target.float()
            self.invalid_targets += invalid_rows(target).sum()
        return TeacherTarget(
            weights.clone(),
            target.clone(),
            out.bad_rows.clone() if out.bad_rows is not None else None,
            prediction.clone() if prediction is not None else None,
            [f.clone() for f in out.features] if out.features is not None else None,
        )

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        self.model.train()
        if self.loss.uses_teachers and hasattr(self.producer, "set_epoch"):
            self.producer.set_epoch(epoch)  # a store serves the views of this epoch
        self.invalid_targets = torch.zeros((), dtype=torch.long, device=self.device)
        if hasattr(self.loss, "set_epoch"):
            with running(self.loss, "the loss"):
                self.loss.set_epoch(epoch, epochs)

    def check_targets(self, epoch: int) -> None:
        """Refuse an epoch in which the combiner gave NaN, Inf or negative probabilities
        (counted on the device by each step, checked here so no step waits for it)."""
        count = int(distributed.all_reduce_sum(self.invalid_targets.float()))
        if count:
            rows = f"{count} row{'s' * (count != 1)}"
            raise PluginError(
                f"{component_name(self.combiner, 'the combiner')} returned NaN, Inf or "
                f"negative probabilities for {rows} in epoch {epoch + 1}; nothing of that "
                "epoch is kept"
            )

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on a CPU batch; see the class docstring for what it returns."""
        strong = None
        if self.strong:  # [B, 2, ...]: the weak views, and the unlabeled rows' strong ones
            unlabeled = y < 0
            x, strong = x[:, 0], x[:, 1][unlabeled]
            rows = self.unlabeled_position[idx[unlabeled]].to(self.device, non_blocking=True)
            unlabeled = unlabeled.to(self.device, non_blocking=True)
        x = x.to(self.device, non_blocking=True)  # teachers get it contiguous (memory_format)
        labels = y.to(self.device, non_blocking=True)
        soft, valid = None, None
        if self.mixup is not None:
            x, soft, valid = self.mixup(x, labels)
            if soft is not None:  # mixed rows have no single label
                labels = torch.full_like(labels, -1)
        stats: dict[str, torch.Tensor] = {}
        teachers = None
        keep = None
        with autocast(self.device):
            if self.loss.uses_teachers:
                teachers = self.teacher_target(x, idx, labels)
                if teachers.bad is not None:  # --skip-bad-rows: a teacher gave NaN/Inf here
                    keep = ~teachers.bad
            student_x = x if strong is None else torch.cat([x, strong.to(self.device)])
            student_x = self.normalize(student_x.contiguous(memory_format=self.memory_format))
            if self.features is not None:
                kept = torch.arange(len(x), device=self.device)
                kept = kept if keep is None else kept[keep]
                logits, feature_term = self.forward(student_x, teachers.features_of(keep), kept)
            else:
                logits = self.forward(student_x)
            logits = logits.float()
        if strong is not None:
            logits, strong_logits = logits[: len(x)], logits[len(x) :]
        all_logits = logits
        if teachers is not None:
            weights, target = teachers.weights, teachers.target
            if keep is not None:
                stats["bad_rows"] = teachers.bad.sum()
                weights = weights * keep
                logits, target, labels = logits[keep], target[keep], labels[keep]
                if soft is not None:
                    soft, valid = soft[keep], valid[keep]
                if not len(logits) and distributed.world_size() == 1:
                    return stats
            stats["weights"] = weights.sum(1)
        if not len(logits):
            # every row of this rank's batch was dropped: the other ranks' backward waits
            # for this one's gradients, so join it with zero gradients
            ce = kd = total = all_logits.sum() * 0.0
        else:
            if soft is not None:
                ce = -(soft * torch.log_softmax(logits, -1)).sum(-1)
                ce = (ce * valid).sum() / valid.sum().clamp_min(1)
            else:
                count = (labels >= 0).sum().clamp_min(1)
                ce = F.cross_entropy(
                    logits,
                    labels,
                    ignore_index=-1,
                    reduction="sum",
                    label_smoothing=self.label_smoothing,
                )
                ce = ce / count
            kd = ce.new_zeros(())
            if self.loss.uses_teachers:
                with running(self.loss, "the loss"):
                    kd = self.loss(logits, target, labels)
            total = self.loss.ce_weight * ce + self.loss.kd_weight * kd
        if strong is not None:
            term = self.consistency(all_logits, strong_logits, unlabeled, rows, teachers, keep)
            stats["consistency"] = term.detach() * len(logits)
            total = total + term
        if self.features is not None:
            stats["features"] = feature_term.detach() * len(logits)
            total = total + feature_term
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.clip_grad is not None:
            from timm.utils import dispatch_clip_grad

            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op unscaled)
            dispatch_clip_grad(self.trained.parameters(), self.clip_grad, mode=self.clip_mode)
        self.scaler.step(self.optimizer)  # skipped when float16 gradients overflowed
        self.scaler.update()
        self.updates += 1
        self.scheduler.step_update(num_updates=self.updates)
        if self.ema is not None:
            self.ema.update(self.model, step=self.updates)
        rows = len(logits)
        stats.update(loss=total.detach() * rows, ce=ce.detach() * rows, kd=kd.detach() * rows)
        stats["rows"] = rows
        return stats

    def consistency(
        self,
        logits: torch.Tensor,
        strong_logits: torch.Tensor,
        unlabeled: torch.Tensor,
        rows: torch.Tensor,
        teachers: TeacherTarget | None,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        """The consistency loss's term on the batch's unlabeled rows: the student's weak-view
        ``logits [B, C]`` (those rows, detached), its ``strong_logits [U, C]``, the teachers'
        prediction at T = 1 (rows dropped by ``keep`` left out)."""
        weak = logits[unlabeled].detach()
        prediction = teachers.prediction[unlabeled] if teachers is not None else None
        if keep is not None:
            kept = keep[unlabeled]
            weak, strong_logits, rows = weak[kept], strong_logits[kept], rows[kept]
            prediction = prediction[kept]
        if not len(weak):
            return strong_logits.sum() * 0.0
        with running(self.loss, "the loss"):
            return self.loss.consistency(weak, strong_logits, prediction, rows)

    def end_epoch(self, epoch: int) -> None:
        self.scheduler.step(epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),  # {} when disabled
            "updates": self.updates,
        }
        if self.features is not None:  # the projector: the run's, not the student's
            state["projector"] = self.features.projector.state_dict()
        if hasattr(self.loss, "state_dict"):  # what the loss learns (FlexMatch's counts)
            with running(self.loss, "the loss"):
                state["loss"] = self.loss.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.features is not None:
            self.features.projector.load_state_dict(state["projector"])
        if state.get("loss") and hasattr(self.loss, "load_state_dict"):
            with running(self.loss, "the loss"):
                self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):  # none from a run without float16 (or before the scaler)
            self.scaler.load_state_dict(state["scaler"])
        self.updates = state["updates"]


def build_optimizer(model: torch.nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    """``--opt``, ``--lr``, ``--weight-decay``, ``--momentum`` through timm's
    ``create_optimizer_v2`` (no weight decay on biases and norms, timm's default)."""
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(
            model,
            opt=config.opt,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
        )
    except (ImportError, ValueError, TypeError, AssertionError) as exc:  # e.g. bnb* on a CPU
        raise UsageError(f"--opt {config.opt}: timm could not create it ({exc})") from None


def build_scheduler(optimizer: torch.optim.Optimizer, config: DistillConfig, updates: int) -> Any:
    """``--sched`` and its options through timm's ``create_scheduler_v2``, stepped after
    every optimizer update (``updates`` per epoch), as kdplug always has."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config.sched,
        num_epochs=config.epochs,
        decay_epochs=config.decay_epochs,
        **({"decay_milestones": config.decay_milestones} if config.decay_milestones else {}),
        decay_rate=config.decay_rate,
        min_lr=config.min_lr,
        warmup_lr=config.warmup_lr,
        warmup_epochs=config.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates,
    )
    return scheduler


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    from kdplug.outputs import atomic_path

    with atomic_path(path) as tmp:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        # bytes written by Python: a full disk is an OSError that atomic_path reports
        # (torch.save into a file turns it into RuntimeError "unexpected pos")
        tmp.write_bytes(buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(
            f"checkpoint {path} is not readable ({type(exc).__name__}); start over with --overwrite"
        ) from None


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory: the CUDA allocator's, else the process's resident set size."""
    if device.type == "cuda":
        return {"device": "cuda", "bytes": int(torch.cuda.max_memory_allocated(device))}
    return {
        "device": "cpu-rss",
        "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
    }


def loss_terms(loss: Any) -> list[str]:
    """The terms metrics.jsonl reports for ``loss``: the total, ``ce``, ``kd``, and
    ``consistency`` and ``features`` where the loss has them."""
    terms = ["loss", "ce", "kd"]
    if getattr(loss, "strong_augment", None) is not None:
        terms.append("consistency")
    if getattr(loss, "feature_stages", None) is not None:
        terms.append("features")
    return terms


def losses_that_ran(loss: Any) -> list[str]:
    """The train losses of ``loss``'s runs: the total, and the terms that count in it
    (``ce``, ``kd`` where their weights are not 0: a labels-only loss runs no kd term)."""
    idle = set()
    if loss.ce_weight <= 0:
        idle.add("ce")
    if not (loss.uses_teachers and loss.kd_weight > 0):
        idle.add("kd")
    return [term for term in loss_terms(loss) if term not in idle]


def plot_curves(history: list[dict[str, Any]], path: Path, loss: Any) -> None:
    """The train losses that ran (``losses_that_ran``) and val accuracy per epoch."""
    from matplotlib.ticker import MaxNLocator

    from kdplug.reports.figures import new_figure, save_figure

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = new_figure(1, 2, figsize=(10, 4))
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for key in losses_that_ran(loss):
        left.plot(epochs, [h[key] for h in history], marker="o", label=key)
    left.set_xlabel("epoch")
    left.set_title("train loss")
    left.legend()
    accuracy = [h["val_accuracy"] for h in history]
    if any(a is not None for a in accuracy):
        right.plot(epochs, [np.nan if a is None else a for a in accuracy], marker="o")
    right.set_xlabel("epoch")
    right.set_title("val accuracy")
    save_figure(fig, path)


@discarding_unstarted_runs()
def distill(config: DistillConfig, producer: Any = None) -> dict[str, Any]:
    """Run (or resume) a distillation and return its summary (summary.json's content).

    ``producer``: a teacher-output producer used instead of the live teachers of ``config``.
    """
    from kdplug.device import pick_device, seed_epoch, seed_everything
    from kdplug.outputs import prepare_out_dir
    from kdplug.plugins import get_manager
    from kdplug.run import Run

    config.validate()
    device = pick_device(config.device)
    seed_everything(config.seed)
    parts = build_parts(config, producer)
    main = distributed.is_main()
    out = Path(config.out)
    if main:
        record = config.record()
        prepare_out_dir(
            out,
            resume=config.resume,
            overwrite=config.overwrite,
            marker=MARKER,
            config=record,
            inputs=[
                *map(str, config.teachers),
                config.store,
                written(config.student),
                config.train,
                written(config.unlabeled),
                config.val,
                config.calibration,
                config.calibration_data,
            ],
        )
    distributed.barrier()
    finished = finished_summary(out, config)
    if finished is not None:
        return finished
    rows = TrainRows(parts.train, parts.unlabeled)
    plan = epoch_plan(rows, parts.loss, config)  # before any teacher runs: it may refuse
    if parts.producer is not None and hasattr(parts.producer, "to"):
        parts.producer.to(device)
    if hasattr(parts.producer, "check_rows"):
        parts.producer.check_rows(len(rows))
    fitted = fit_on_labeled_rows(parts, config, device)
    checks = check_teachers(parts, config, device) if main else None
    trainer = Trainer(parts, config, device, updates_per_epoch(plan[1], config.batch_size))
    val = val_batches(parts.val, config, trainer.cuda)
    producer = parts.producer if parts.loss.uses_teachers else None
    loader = train_loader(rows, config, trainer.cuda, parts.loss, plan, producer)
    names = teacher_names(parts)
    progress = start_progress(out, trainer, config, main)
    run = Run(
        config=config.record(),
        out=out,
        state={**progress, "fitted": fitted},
        options={key: getattr(config, key) for key in config.RUNTIME},
    )
    if main:
        get_manager().notify("on_fit_start", run=run)
    for epoch in range(progress["epoch"], config.epochs):
        seed_epoch(config.seed, epoch, distributed.rank())
        line = train_epoch(trainer, loader, val, names, config, epoch, show=main)
        accuracy = line["val_accuracy"]
        best = progress["best_accuracy"]
        improved = accuracy is not None and (best is None or accuracy > best)
        progress["history"].append(line)
        progress["epoch"] = epoch + 1
        if improved:
            progress["best_accuracy"], progress["best_epoch"] = accuracy, epoch + 1
            if keeps_best(config, parts):
                state = trainer.eval_model.state_dict()
                progress["best_state"] = {k: v.detach().cpu().clone() for k, v in state.items()}
        if main:
            end_epoch_files(out, trainer, parts, progress, line, improved)
            get_manager().notify("on_epoch_end", run=run, epoch=epoch + 1, metrics=line)

    summary = make_summary(config, parts, progress, device)
    summary["fitted"] = fitted
    summary["teacher_checks"] = checks
    if main:
        if keeps_best(config, parts) and progress["best_state"] is not None:
            trainer.eval_model.load_state_dict(progress["best_state"])
        save_model_dir(out, trainer.eval_model, parts)
        plot_curves(progress["history"], out / CURVES, parts.loss)
        from kdplug.outputs import write_json

        write_json(out / SUMMARY, summary)
        get_manager().notify("on_fit_end", run=run, summary=summary)
    return summary


def finished_summary(out: Path, config: DistillConfig) -> dict[str, Any] | None:
    """The summary of the finished run that ``--resume`` found in ``out``, else None.

    summary.json is written last, after the last epoch, and ``--resume`` only reaches here
    with the same configuration: checked before any teacher runs or any part is fitted."""
    summary = out / SUMMARY
    if not (config.resume and summary.exists()):
        return None
    log.info("%s is already finished", out)
    return json.loads(summary.read_text())


def check_teachers(parts: Parts, config: DistillConfig, device: torch.device) -> dict | None:
    """``kdplug.teacher_checks`` on the labeled train rows: what summary.json records as
    ``teacher_checks`` (None when the loss uses no teachers)."""
    if not parts.loss.uses_teachers:
        return None
    labeled = np.flatnonzero(parts.train.labels() >= 0)
    rows = "--train rows"  # the message reads "near chance on N labeled --train rows"
    flags, _ = teacher_checks.check_on_rows(
        parts.producer, parts.train, labeled, config.batch_size, device, rows
    )
    return teacher_checks.record(parts.producer, flags)


def fit_on_labeled_rows(parts: Parts, config: DistillConfig, device: torch.device) -> dict:
    """Fit the combiner and loss that can fit (``kdplug.fitting``, e.g. ``auto``,
    ``kd,T=auto``) on the teachers' outputs for the labeled ``--calibration-data`` rows,
    else the train rows with labels; what they fitted (JSON-ready) goes into summary.json."""
    if not parts.loss.uses_teachers:
        return {}
    from kdplug.fitting import can_fit, fit_on_rows

    source, flag = parts.train, "--train"
    if parts.calibration_data is not None:
        source, flag = parts.calibration_data, "--calibration-data"
        if not can_fit(parts.combiner) and not can_fit(parts.loss):
            log.warning("--calibration-data is unused: neither the combiner nor the loss fits")
    labeled = np.flatnonzero(source.labels() >= 0)
    return fit_on_rows(
        parts.combiner,
        parts.loss,
        parts.producer,
        source,
        labeled,
        config.batch_size,
        device,
        f"labeled {flag} rows",
        shared=True,  # every rank runs the teachers on its share; all fit the same rows
    )


def teacher_names(parts: Parts) -> list[str]:
    """The teachers' specs, in order; none when the loss uses no teachers."""
    return list(parts.producer.names) if parts.loss.uses_teachers else []


def teacher_specs(parts: Parts) -> list[str]:
    """The spec text of each teacher in ``teacher_names``' order (a producer without
    ``specs``: its names)."""
    return list(getattr(parts.producer, "specs", None) or teacher_names(parts))


def keeps_best(config: DistillConfig, parts: Parts) -> bool:
    """The student kept is the best by val accuracy (else the last epoch's)."""
    return config.keep == "best" and parts.val is not None


def start_progress(
    out: Path, trainer: Trainer, config: DistillConfig, main: bool
) -> dict[str, Any]:
    """Fresh progress, or the checkpoint's under ``--resume`` (the trainer restored; every
    epoch seeds its own RNGs, ``kdplug.device.seed_epoch``)."""
    checkpoint = out / CHECKPOINT
    if not (config.resume and checkpoint.exists()):
        return {
            "epoch": 0,
            "best_accuracy": None,
            "best_epoch": None,
            "best_state": None,
            "history": [],
        }
    stored = load_checkpoint(checkpoint)
    trainer.load_state_dict(stored["trainer"])
    progress = stored["progress"]
    if main:  # metrics lines after the checkpoint's epoch belong to an epoch that is redone
        from kdplug.outputs import write_text

        write_text(out / METRICS, "".join(json.dumps(h) + "\n" for h in progress["history"]))
    log.info("resuming %s after epoch %d of %d", out, progress["epoch"], config.epochs)
    return progress


def epoch_plan(rows: TrainRows, loss: Any, config: DistillConfig) -> tuple[Any, int]:
    """``(order, rows)``: ``order(epoch)`` gives this rank's rows of each epoch and ``rows``
    how many: the train and unlabeled rows shuffled together (``train_order``), or batches
    of a fixed share of labeled rows when the loss sets ``unlabeled_ratio``
    (``kdplug.consistency_data.RatioOrder``)."""
    ratio = getattr(loss, "unlabeled_ratio", None)
    if ratio is None:
        return functools.partial(train_order, len(rows), config.seed), distributed.rows_per_rank(
            len(rows)
        )
    from kdplug.consistency_data import RatioOrder

    spec = f"--loss {written(config.loss)}"
    order = RatioOrder(rows.labels(), config.batch_size, ratio, config.seed, spec)
    log.info(
        "each step: %d labeled and %d unlabeled rows (the loss's mu %g); an epoch is %d "
        "steps, one pass over the unlabeled rows",
        order.labeled_per_batch,
        order.unlabeled_per_batch,
        ratio,
        order.steps,
    )
    return order, order.rows


def updates_per_epoch(rows: int, batch_size: int) -> int:
    """The optimizer steps each rank takes per epoch of ``rows`` rows per rank
    (``epoch_plan``), which the learning-rate schedule is planned for."""
    return batch_count(rows, batch_size, drop_last=True)


def train_order(rows: int, seed: int, epoch: int) -> Sequence[int]:
    """This rank's rows of ``epoch``: its share (``distributed.epoch_rows``), or in a single
    process all ``rows`` rows shuffled (an int64 array)."""
    share = distributed.epoch_rows(rows, seed, epoch)
    return share if share is not None else shuffled(np.arange(rows), seed, epoch)


def train_loader(
    rows: TrainRows,
    config: DistillConfig,
    pin: bool,
    loss: Any = None,
    plan: tuple[Any, int] | None = None,
    producer: Any = None,
) -> EpochLoader:
    """The training batches of every epoch (``set_epoch``) in ``plan``'s order (default:
    ``epoch_plan`` for ``loss``), built once: decoding and ``--augment``'s per-image
    transform run in the loader's workers, which persist across epochs, and the batches are
    pinned when ``pin`` (CUDA). Mixup stays in the step. A consistency loss gets both views
    of each row (``kdplug.consistency_data.TwoViews``); a ``producer`` with
    ``rebuild_views`` (a teacher store) gets each row's view of the epoch rebuilt there too
    (of the weak view, with two)."""
    from kdplug.augment import Augment, parse_augment

    options = parse_augment(config.augment)
    weak = options[0] if options is not None else None
    augment = Augment(rows.train.input_shape, weak) if weak is not None else None
    strong = getattr(loss, "strong_augment", None)
    if strong is not None:
        from kdplug.consistency_data import TwoViews

        augment = TwoViews(rows.train.input_shape, weak, dict(strong))
    views = getattr(producer, "rebuild_views", None) if producer is not None else None
    if views is not None and strong is not None:
        from kdplug.consistency_data import WeakViews

        views = WeakViews(views)
    order, count = plan if plan is not None else epoch_plan(rows, loss, config)
    sampler = EpochBatches(order, count, config.batch_size, config.seed, distributed.rank())
    return epoch_loader(
        rows, sampler, augment=augment, views=views, workers=config.workers, pin_memory=pin
    )


def train_epoch(
    trainer: Trainer,
    loader: EpochLoader,
    val: Any,
    names: list[str],
    config: DistillConfig,
    epoch: int,
    show: bool,
) -> dict[str, Any]:
    """Train one epoch on ``loader``'s batches of ``epoch``, validate on the ``val`` batches
    (or None); returns the epoch's metrics.jsonl line (``names``: the teachers, for their
    mean weights)."""
    from kdplug.progress import Progress

    trainer.begin_epoch(epoch, config.epochs)
    loader.set_epoch(epoch)
    totals: dict[str, Any] = {}
    start = time.perf_counter()
    desc = f"epoch {epoch + 1}/{config.epochs}"
    every = config.log_interval
    # the epoch's line (end_epoch_files) closes it; loss and lr are read only when shown
    with Progress(
        desc, len(loader), unit="step", every=every, show=show, end_line=False
    ) as progress:
        for x, y, idx in loader:
            for key, value in trainer.step(x, y, idx).items():
                totals[key] = totals[key] + value if key in totals else value
            rows = len(x) * distributed.world_size()  # every rank steps on as many rows
            progress.update(rows=rows, values=lambda: running_numbers(trainer, totals))
    trainer.check_targets(epoch)
    trainer.end_epoch(epoch)
    if trainer.cuda:  # the epoch's GPU work is done before its time is read
        torch.cuda.synchronize(trainer.device)
    train_time = time.perf_counter() - start
    if distributed.world_size() > 1:
        totals = reduce_totals(totals, len(names), trainer.device, loss_terms(trainer.loss))
        train_time = float(distributed.all_reduce_mean(torch.tensor(train_time).to(trainer.device)))
    seen = max(int(totals.get("rows", 0)), 1)
    accuracy, val_nll = validate(trainer, val)
    weights = (totals["weights"] / seen).tolist() if "weights" in totals else []
    return {
        "epoch": epoch + 1,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        **{
            key: float(totals[key]) / seen if key in totals else 0.0
            for key in loss_terms(trainer.loss)
        },
        "val_accuracy": accuracy,
        "val_nll": val_nll,
        "teacher_weights": dict(zip(names, weights)),
        "bad_rows": int(totals.get("bad_rows", 0)),
        "samples_per_s": seen / train_time,
        "epoch_time_s": time.perf_counter() - start,
    }


def running_numbers(trainer: Trainer, totals: dict[str, Any]) -> dict[str, float]:
    """The epoch's mean loss so far (this rank's rows) and the learning rate, for the
    progress line (reading the loss waits for the device)."""
    rows = max(int(totals.get("rows", 0)), 1)
    loss = float(totals["loss"]) / rows if "loss" in totals else float("nan")
    return {"loss": loss, "lr": trainer.optimizer.param_groups[0]["lr"]}


def reduce_totals(
    totals: dict[str, Any], teachers: int, device: torch.device, terms: list[str]
) -> dict:
    """The epoch's sums over all ranks (every key on every rank, so the collectives match:
    a rank whose rows were all dropped as bad has no ``weights`` of its own)."""
    zeros: dict[str, Any] = {**dict.fromkeys(terms, 0.0), "rows": 0, "bad_rows": 0}
    if teachers:
        zeros["weights"] = torch.zeros(teachers)
    return {
        key: distributed.all_reduce_sum(
            torch.as_tensor(totals.get(key, zero), dtype=torch.float32).to(device)
        )
        for key, zero in zeros.items()
    }


def val_batches(val: DataSource | None, config: DistillConfig, pin: bool) -> Any:
    """The val batches: decoded once and kept when they fit in ``VAL_CACHE_BYTES``, else a
    loader that reads them each epoch; None without ``--val``."""
    if val is None:
        return None
    loader = batches(
        val, config.batch_size, workers=config.workers, pin_memory=pin, persistent=True
    )
    if len(val) * math.prod(val.input_shape) * 4 <= VAL_CACHE_BYTES:
        return list(loader)
    return loader


def validate(trainer: Trainer, loader: Any) -> tuple[float | None, float | None]:
    """Val accuracy and NLL of the EMA (or the student), or (None, None) without val data."""
    if loader is None:
        return None, None
    from kdplug import metrics
    from kdplug.engines.eval import predict

    model = trainer.eval_model.eval()
    probs, labels = predict(lambda x: model(trainer.normalize(x)), loader, trainer.device)
    return metrics.accuracy(probs, labels), metrics.nll(probs, labels)


def save_model_dir(out: Path, model: torch.nn.Module, parts: Parts) -> None:
    """The student directory (``kdplug.model_dir``); a student that is not timm's records
    its component and its factory's options (``model_args``), and one of feature rows its
    kind and the features it reads, in order."""
    from kdplug.model_dir import save_student

    fields: dict[str, Any] = {}
    if parts.student_name != "timm":
        fields["student"] = parts.student_name
    if parts.train.kind == "tabular":
        fields.update(data_kind="tabular", feature_names=list(parts.train.input_columns))
    save_student(
        out / STUDENT,
        model,
        architecture=parts.architecture,
        classes=parts.classes,
        input_size=list(parts.train.input_shape),
        mean=parts.mean,
        std=parts.std,
        model_args=getattr(model, "model_args", None),
        fields=fields or None,
    )


def end_epoch_files(
    out: Path,
    trainer: Trainer,
    parts: Parts,
    progress: dict[str, Any],
    line: dict[str, Any],
    improved: bool,
) -> None:
    """The student (when it improved), then the checkpoint, then the metrics line."""
    from kdplug.outputs import append_jsonl

    if improved and progress["best_state"] is not None:  # keeping the best: save it now
        save_model_dir(out, trainer.eval_model, parts)
    state = {"trainer": trainer.state_dict(), "progress": progress}
    save_checkpoint(out / CHECKPOINT, state)
    append_jsonl(out / METRICS, line)
    accuracy = line["val_accuracy"]
    progress_log.info(
        "epoch %d: loss %.4f, lr %.4g, val accuracy %s, %.0f samples/s",
        line["epoch"],
        line["loss"],
        line["lr"],
        "-" if accuracy is None else f"{accuracy:.4f}",
        line["samples_per_s"],
    )


def make_summary(
    config: DistillConfig, parts: Parts, progress: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """summary.json: accuracies, epoch times, peak memory, teachers, data, versions."""
    import timm

    from kdplug.outputs import versions

    history = progress["history"]
    names = teacher_names(parts)
    fingerprints = parts.producer.fingerprints() if names else []
    return {
        "status": "finished",
        "epochs": config.epochs,
        "final_val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": progress["best_accuracy"],
        "best_epoch": progress["best_epoch"],
        "kept": "best" if keeps_best(config, parts) else "last",
        "student": str(Path(config.out) / STUDENT),
        "student_architecture": parts.architecture,
        "normalization": {"mean": parts.mean, "std": parts.std},
        "epoch_times_s": [h["epoch_time_s"] for h in history],
        "samples_per_s": float(np.mean([h["samples_per_s"] for h in history])),
        "peak_memory": peak_memory(device),
        "bad_rows": sum(h["bad_rows"] for h in history),
        "device": str(device),
        "teachers": [
            {"name": n, "spec": s, "fingerprint": f}
            for n, s, f in zip(names, teacher_specs(parts), fingerprints)
        ],
        "data": {
            "train": _describe(parts.train, config.train),
            "unlabeled": _describe(parts.unlabeled, config.unlabeled),
            "val": _describe(parts.val, config.val),
            "calibration_data": _describe(parts.calibration_data, config.calibration_data),
        },
        "config": config.record(),
        "versions": {**versions(), "torch": torch.__version__, "timm": timm.__version__},
    }
