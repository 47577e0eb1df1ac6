"""``kdplug self-train``: the Noisy Student loop on top of the label and distill engines.

Each round: the teachers pseudo-label the unlabeled data (``kdplug label``); the accepted
rows, with their soft labels, join the labeled rows; a fresh student trains on both with
noise (augmentation, drop-path) from those targets; the student then joins the teachers
(or replaces them with ``replace=True``) for the next round.

The targets reach the student as a precomputed-probabilities teacher (``logits``): one
row per training row in distill's order (labeled rows one-hot, then pseudo-labeled rows).
The engine hands label and distill ``Spec`` objects built from values (``Spec.of``), never
spec text it formatted, so class names and paths arrive as they are.

After the rounds, a baseline (round 0, ``baseline/``) trains the same student on the
labeled rows alone with the same budget (last, so that a teacher that fails stops the run
before any training); the best of rounds 0..N by validation accuracy is the run's answer
(``best_round``, ``best_student`` in ``self_train.json``). Images with an image student
(``timm:ARCH``) or feature rows with a tabular one (``tabular:mlp``): data of another kind
than the student's, or ``--augment`` on feature rows, is refused before any work.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdplug.errors import UsageError
from kdplug.outputs import discarding_unstarted_runs, write_json
from kdplug.spec import Spec, parse_spec

log = logging.getLogger("kdplug")
MARKER = "run.json"
SUMMARY = "self_train.json"
BASELINE = "baseline"  # round 0: the student on the labeled rows alone
# the round's student learns the targets alone: its labeled rows are one-hot targets
TARGET_LOSS = Spec.of("kd", T=1.0, ce_weight=0.0, kd_weight=1.0)
LABELS_ONLY = Spec.of("ce")
ONE_TEACHER = Spec.of("mean")
TARGET_BLOCK = 4_000_000  # values (rows x classes) copied at a time into a round's targets


@dataclass
class SelfTrainConfig:
    teachers: list[str]
    student: str
    train: str
    unlabeled: str
    val: str
    out: str
    rounds: int = 3
    generator: str | None = None  # None: label's default generator
    # label's rule without held-out labeled rows; a combiner with fit (auto) gets --train
    combiner: str = "mean"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    augment: str | None = None
    drop_path: float = 0.1
    replace: bool = False
    device: str = "auto"
    seed: int = 0
    eval_labels: str | None = None  # true labels of --unlabeled, row for row
    # distill's optimizer and schedule options (--opt, --sched, ...) by DistillConfig field
    training: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    overwrite: bool = False

    def record(self) -> dict[str, Any]:
        skip = ("device", "resume", "overwrite")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def student_spec(text: str, drop_path: float) -> Spec:
    """The student spec with stochastic depth added (noise), unless it sets its own or its
    factory has no ``drop_path_rate`` (a tabular MLP: its noise is its ``dropout=``)."""
    spec = parse_spec(text)
    if drop_path <= 0 or "drop_path_rate" in spec.options or not takes_drop_path(spec):
        return spec
    return spec.plus(drop_path_rate=drop_path)


def takes_drop_path(spec: Spec) -> bool:
    """Whether the student factory of ``spec`` has a ``drop_path_rate`` option."""
    from kdplug.plugins import get_manager

    options = get_manager().registries["students"].get(spec.name).options()
    return options is None or "drop_path_rate" in options


def pseudo_rows(labels_dir: Path) -> tuple[Any, np.ndarray]:
    """The labels dataset at ``labels_dir`` and the positions (in the unlabeled data) of its
    accepted rows; their soft labels stay on disk until ``write_targets`` copies them."""
    import datasets

    labeled = datasets.load_from_disk(str(labels_dir))
    if "probs" not in labeled.column_names:
        raise UsageError("self-train needs full soft labels: use a generator without topk")
    columns = labeled.with_format("arrow")
    return labeled, columns["index"].to_numpy()[columns["accepted"].to_numpy()]


def write_round_data(unlabeled: Any, rows: np.ndarray, out: Path, pool: str) -> Spec:
    """Save the accepted unlabeled rows as a dataset (atomically); return its data spec."""
    from kdplug.outputs import atomic_path

    with atomic_path(out, directory=True) as tmp:
        unlabeled.dataset.select(rows).save_to_disk(str(tmp))
    return round_data(out, pool)


def round_data(path: Path, pool: str) -> Spec:
    """The data spec of a round's saved rows, read as the pool ``pool`` is read: with its
    data options (``image_size=``, ``image_mode=``, ``image_column=``, ...) as written."""
    from kdplug.data import DATA_OPTIONS
    from kdplug.data_paths import data_spec

    written = data_spec(pool).raw or {}
    return Spec.of("disk", str(path), **{k: written[k] for k in DATA_OPTIONS if k in written})


def write_targets(train_labels: np.ndarray, labeled: Any, classes: list[str], path: Path) -> Spec:
    """Probabilities for distill's rows (labeled rows one-hot, then the accepted rows of the
    labels dataset ``labeled``, in its order), written atomically into a ``.npy`` a block of
    rows at a time (memory bounded by the block, not by the rows); return the teacher that
    serves them, named by ``classes``."""
    from kdplug.outputs import atomic_path

    table = labeled.with_format("arrow")
    accepted = table["accepted"].to_numpy()
    rows, C = len(train_labels) + int(accepted.sum()), len(classes)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, C))
        step = max(1, TARGET_BLOCK // C)  # the memmap starts as zeros: set the ones
        for start in range(0, len(train_labels), step):
            block = train_labels[start : start + step]
            out[start + np.arange(len(block)), block] = 1.0
        at = len(train_labels)
        for start in range(0, len(table), step):
            keep = accepted[start : start + step]
            probs = table[start : start + step].column("probs").combine_chunks()
            kept = probs.flatten().to_numpy().reshape(-1, C)[keep]
            out[at : at + len(kept)] = kept
            at += len(kept)
        out.flush()
        del out
    return Spec.of("logits", str(path), probs=True, classes=[str(c) for c in classes])


def student_teacher(round_dir: Path) -> Spec:
    """The round's student as a teacher of the next round."""
    return Spec.of("kdplug", str(round_dir / "distill" / "student"))


def run_round(
    cfg: SelfTrainConfig,
    number: int,
    teachers: list[str | Spec],
    train: Any,
    unlabeled: Any,
    root: Path,
    fit_rows: str | None = None,
) -> dict[str, Any]:
    """One round: label, select, distill; return the round's row of the result table.
    ``fit_rows``: the labeled rows a combiner with ``fit`` (auto) is fitted on, or None."""
    from kdplug.engines.label import LabelConfig, run_label

    root.mkdir(parents=True, exist_ok=True)
    report = run_label(
        LabelConfig(
            teachers=teachers,
            data=cfg.unlabeled,
            out=str(root / "labels"),
            combiner=cfg.combiner,
            generator=cfg.generator,
            classes=train.classes,
            device=cfg.device,
            resume=cfg.resume,
            batch_size=cfg.batch_size,
            progress=False,
            eval_labels=cfg.eval_labels,
            calibration_data=fit_rows,
            probs="full",  # the rounds train on the accepted rows' soft labels
        )
    )
    labeled, rows = pseudo_rows(root / "labels")
    if not len(rows):
        raise UsageError(
            f"round {number}: the generator {cfg.generator} accepted no row; lower its threshold"
        )
    if not cfg.resume or not (root / "pseudo").exists():
        pseudo = write_round_data(unlabeled, rows, root / "pseudo", cfg.unlabeled)
    else:
        pseudo = round_data(root / "pseudo", cfg.unlabeled)
    target = write_targets(train.labels(), labeled, train.classes, root / "targets.npy")
    summary = train_student(
        cfg, number, root / "distill", teachers=[target], unlabeled=pseudo, loss=TARGET_LOSS
    )
    accuracy = (report.get("eval") or {}).get("accuracy_accepted")
    return {
        "round": number,
        "teachers": len(teachers),
        "accepted": int(len(rows)),
        "pseudo_label_accuracy": accuracy,
        "val_accuracy": summary["best_val_accuracy"],
        "student": summary["student"],
    }


def train_student(cfg: SelfTrainConfig, number: int, out: Path, **what: Any) -> dict[str, Any]:
    """Distill round ``number``'s student into ``out`` with the run's budget and noise
    (the same for every round and the baseline); ``what``: its teachers, rows and loss."""
    from kdplug.engines.distill import DistillConfig, distill

    return distill(
        DistillConfig(
            student=student_spec(cfg.student, cfg.drop_path),
            train=cfg.train,
            val=cfg.val,
            out=str(out),
            combiner=ONE_TEACHER,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            augment=cfg.augment,
            device=cfg.device,
            seed=cfg.seed + number,
            **cfg.training,
            resume=cfg.resume,
            **what,
        )
    )


def run_baseline(cfg: SelfTrainConfig, root: Path) -> dict[str, Any]:
    """Round 0: the student trained on the labeled rows alone, what every round must beat."""
    summary = train_student(cfg, 0, root, loss=LABELS_ONLY)
    return {
        "round": 0,
        "teachers": 0,
        "accepted": 0,
        "pseudo_label_accuracy": None,
        "val_accuracy": summary["best_val_accuracy"],
        "student": summary["student"],
    }


def best_of(baseline: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of the highest val accuracy, the earliest of equals (round 0: the baseline)."""
    return max([baseline, *rows], key=lambda row: row["val_accuracy"])


def best_line(summary: dict[str, Any]) -> str:
    """The line that says which student to use."""
    best, baseline = summary["best_round"], summary["baseline"]["val_accuracy"]
    if best == 0:
        return (
            f"best: round 0, the labels-only baseline (val accuracy {baseline:.4f}): no round "
            f"beat it; its student is {summary['best_student']}"
        )
    return (
        f"best: round {best} (val accuracy {summary['best_val_accuracy']:.4f}, labels only "
        f"{baseline:.4f}): use {summary['best_student']}"
    )


def accuracy_range(values: list[float], least: float = 0.1) -> tuple[float, float]:
    """A y range for accuracies: the values with a margin, at least ``least`` wide, inside
    [0, 1], so that rounds 0.005 apart are not drawn as a cliff."""
    lo, hi = min(values), max(values)
    margin = max((hi - lo) * 0.2, (least - (hi - lo)) / 2)
    lo, hi = lo - margin, hi + margin
    if hi > 1:
        lo, hi = lo - (hi - 1), 1.0
    if lo < 0:
        lo, hi = 0.0, min(hi - lo, 1.0)
    return lo, hi


def plot_rounds(
    baseline: dict[str, Any], rows: list[dict[str, Any]], best: dict[str, Any], path: Path
) -> None:
    """Val accuracy per round against the labels-only baseline, the best round starred."""
    from kdplug.reports.figures import new_figure, save_figure

    fig, ax = new_figure(figsize=(5, 3.5))
    numbers, values = [r["round"] for r in rows], [r["val_accuracy"] for r in rows]
    ax.plot(numbers, values, marker="o", label="self-train student")
    for x, y in zip(numbers, values):
        ax.annotate(f"{y:.3f}", (x, y), xytext=(0, 6), textcoords="offset points", ha="center")
    base = baseline["val_accuracy"]
    ax.axhline(base, color="gray", linestyle="--", label=f"labels only (round 0): {base:.3f}")
    ax.plot([0], [base], marker="s", color="gray", linestyle="none")
    ax.plot(
        [best["round"]],
        [best["val_accuracy"]],
        marker="*",
        markersize=14,
        linestyle="none",
        color="C3",
        label=f"best: round {best['round']}",
    )
    ax.set_ylim(*accuracy_range([base, *values]))
    ax.set_xticks([0, *numbers])
    ax.set_xlim(-0.5, max(numbers) + 0.5)
    ax.set_xlabel("round")
    ax.set_ylabel("student val accuracy")
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


def label_default(name: str) -> Any:
    """``kdplug label``'s default of option ``name`` (self-train's label step shares it)."""
    from kdplug.engines.label import LabelConfig

    return next(f.default for f in dataclasses.fields(LabelConfig) if f.name == name)


def check_data_and_student(cfg: SelfTrainConfig, train: Any, unlabeled: Any) -> None:
    """--unlabeled and --val hold rows like --train's, the student takes them and no
    --augment is given for feature rows (distill's checks, made before any work)."""
    from kdplug.data import load_data
    from kdplug.engines.distill import build_student, check_augment, check_like_train

    check_like_train(unlabeled, train, "--unlabeled")
    check_like_train(load_data(cfg.val, train.classes), train, "--val")
    check_augment(cfg.augment, train)
    spec = student_spec(cfg.student, cfg.drop_path)  # as every round builds it
    build_student(spec, train.classes, train)
    if cfg.drop_path > 0 and not takes_drop_path(spec):
        log.info("--drop-path: student %s has no drop_path_rate; its noise is its own", spec)


def check_training(cfg: SelfTrainConfig) -> None:
    """distill's checks of the optimizer and schedule options, made before any work."""
    from kdplug.engines.distill import TRAINING, DistillConfig

    unknown = sorted(set(cfg.training) - set(TRAINING))
    if unknown:
        raise UsageError(f"self-train: unknown training option(s) {', '.join(unknown)}")
    config = DistillConfig(student=cfg.student, train=cfg.train, out=cfg.out, **cfg.training)
    config.epochs, config.lr = cfg.epochs, cfg.lr
    config.validate_training("self-train")


def check_eval_labels(spec: str, unlabeled: Any, classes: list[str]) -> None:
    """``--eval-labels``: labels of ``--unlabeled``'s rows, row for row or by file name
    (``kdplug.eval_labels``), checked before any work."""
    from kdplug.eval_labels import true_labels

    true_labels(spec, unlabeled, classes, "--unlabeled")


def combiner_fit_rows(cfg: SelfTrainConfig) -> str | None:
    """The rows a combiner with ``fit`` (auto) is fitted on each round: ``--train``, the
    only labeled rows self-train has besides ``--val`` (which picks the best round). The
    teachers may be trained on them; the fit then says so and falls back (kdplug.fitting)."""
    from kdplug.fitting import can_fit
    from kdplug.plugins import create

    if not can_fit(create("combiners", cfg.combiner)):
        return None
    log.info("combiner %s: fitted each round on the --train rows %s", cfg.combiner, cfg.train)
    return cfg.train


@discarding_unstarted_runs()
def run_self_train(cfg: SelfTrainConfig, echo: Callable[[str], Any] = log.info) -> dict:
    """Run the baseline and ``cfg.rounds`` rounds into ``cfg.out``; return self_train.json's
    content: the config, ``baseline``, ``rounds``, ``best_round`` and ``best_student``."""
    from kdplug.data import load_data
    from kdplug.outputs import check_out, prepare_out_dir
    from kdplug.plugins import create

    if cfg.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {cfg.rounds}")
    if not cfg.teachers:
        raise UsageError("self-train needs at least one --teacher")
    cfg = dataclasses.replace(cfg, generator=cfg.generator or label_default("generator"))
    inputs = [*cfg.teachers, cfg.student, cfg.train, cfg.unlabeled, cfg.val, cfg.eval_labels]
    check_out(cfg.out, inputs=inputs, overwrite=cfg.overwrite)
    train = load_data(cfg.train)
    if train.classes is None or (train.labels() < 0).any():
        raise UsageError(f"{cfg.train}: every --train row needs a label")
    unlabeled = load_data(cfg.unlabeled)
    check_data_and_student(cfg, train, unlabeled)
    check_training(cfg)
    create("label-generators", cfg.generator)
    fit_rows = combiner_fit_rows(cfg)
    if cfg.eval_labels:
        check_eval_labels(cfg.eval_labels, unlabeled, train.classes)
    out = prepare_out_dir(
        cfg.out,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        marker=MARKER,
        config=cfg.record(),
        inputs=inputs,
    )
    teachers, rows = list(cfg.teachers), []
    for number in range(1, cfg.rounds + 1):
        echo(f"round {number}/{cfg.rounds}: {len(teachers)} teacher(s) label {cfg.unlabeled}")
        row = run_round(cfg, number, teachers, train, unlabeled, out / f"round-{number}", fit_rows)
        rows.append(row)
        echo(
            f"round {number}: {row['accepted']} pseudo-labels, student val accuracy "
            f"{row['val_accuracy']:.4f}"
        )
        student = student_teacher(out / f"round-{number}")
        teachers = [student] if cfg.replace else [*teachers, student]
    echo("round 0 (the baseline): the same student on the labeled rows alone")
    baseline = run_baseline(cfg, out / BASELINE)
    echo(f"round 0: labels only, student val accuracy {baseline['val_accuracy']:.4f}")
    best = best_of(baseline, rows)
    plot_rounds(baseline, rows, best, out / "rounds.png")
    summary = {
        "config": cfg.record(),
        "baseline": baseline,
        "rounds": rows,
        "best_round": best["round"],
        "best_student": best["student"],
        "best_val_accuracy": best["val_accuracy"],
    }
    write_json(out / SUMMARY, summary)
    return summary


def self_train(cfg: SelfTrainConfig, echo: Callable[[str], Any] = log.info) -> list[dict]:
    """Run self-train (``run_self_train``); return one table row per round (1..N)."""
    return run_self_train(cfg, echo)["rounds"]
