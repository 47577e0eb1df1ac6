"""``kdplug self-train``: the Noisy Student loop on top of the label and distill engines.

Each round: the teachers pseudo-label the unlabeled data (``kdplug label``); the accepted
rows, with their soft labels, join the labeled rows; a fresh student trains on both with
noise (augmentation, drop-path) from those targets; the student then joins the teachers
(or replaces them with ``replace=True``) for the next round.

The targets reach the student as a precomputed-probabilities teacher (``logits``): one
row per training row in distill's order (labeled rows one-hot, then pseudo-labeled rows).
The engine hands label and distill ``Spec`` objects built from values (``Spec.of``), never
spec text it formatted, so class names and paths arrive as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdplug.errors import UsageError
from kdplug.outputs import discarding_unstarted_runs, write_json
from kdplug.spec import Spec, parse_spec

log = logging.getLogger("kdplug")
MARKER = "run.json"
SUMMARY = "self_train.json"
# the round's student learns the targets alone: its labeled rows are one-hot targets
TARGET_LOSS = Spec.of("kd", T=1.0, ce_weight=0.0, kd_weight=1.0)
ONE_TEACHER = Spec.of("mean")


@dataclass
class SelfTrainConfig:
    teachers: list[str]
    student: str
    train: str
    unlabeled: str
    val: str
    out: str
    rounds: int = 3
    generator: str = "threshold,tau=0.8"
    combiner: str = "mean"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    augment: str | None = None
    drop_path: float = 0.1
    replace: bool = False
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False

    def record(self) -> dict[str, Any]:
        skip = ("device", "resume", "overwrite")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def student_spec(text: str, drop_path: float) -> Spec:
    """The student spec with stochastic depth added (noise), unless it sets its own."""
    spec = parse_spec(text)
    if drop_path <= 0 or "drop_path_rate" in spec.options:
        return spec
    return spec.plus(drop_path_rate=drop_path)


def pseudo_rows(labels_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (in the unlabeled data) and soft labels ``[M, C]`` of accepted rows."""
    import datasets

    labeled = datasets.load_from_disk(str(labels_dir))
    accepted = np.asarray(labeled["accepted"], dtype=bool)
    if "probs" not in labeled.column_names:
        raise UsageError("self-train needs full soft labels: use a generator without topk")
    probs = np.asarray(labeled["probs"], dtype=np.float32)
    index = np.asarray(labeled["index"], dtype=np.int64)
    return index[accepted], probs[accepted]


def write_round_data(unlabeled: Any, rows: np.ndarray, out: Path) -> Spec:
    """Save the accepted unlabeled rows as a dataset (atomically); return its data spec."""
    from kdplug.outputs import atomic_path

    with atomic_path(out, directory=True) as tmp:
        unlabeled.dataset.select(rows.tolist()).save_to_disk(str(tmp))
    return Spec.of("disk", str(out))


def write_targets(
    train_labels: np.ndarray, probs: np.ndarray, classes: list[str], path: Path
) -> Spec:
    """Probabilities for distill's rows (labeled rows one-hot, then the pseudo-labeled rows),
    saved atomically; return the teacher that serves them, named by ``classes``."""
    from kdplug.outputs import atomic_path

    onehot = np.eye(len(classes), dtype=np.float32)[train_labels]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.concatenate([onehot, probs]).astype(np.float32))
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
) -> dict[str, Any]:
    """One round: label, select, distill; return the round's row of the result table."""
    from kdplug.engines.distill import DistillConfig, distill
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
        )
    )
    rows, probs = pseudo_rows(root / "labels")
    if not len(rows):
        raise UsageError(
            f"round {number}: the generator {cfg.generator} accepted no row; lower its threshold"
        )
    if not cfg.resume or not (root / "pseudo").exists():
        pseudo = write_round_data(unlabeled, rows, root / "pseudo")
    else:
        pseudo = Spec.of("disk", str(root / "pseudo"))
    target = write_targets(train.labels(), probs, train.classes, root / "targets.npy")
    summary = distill(
        DistillConfig(
            teachers=[target],
            student=student_spec(cfg.student, cfg.drop_path),
            train=cfg.train,
            unlabeled=pseudo,
            val=cfg.val,
            out=str(root / "distill"),
            loss=TARGET_LOSS,
            combiner=ONE_TEACHER,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            augment=cfg.augment,
            device=cfg.device,
            seed=cfg.seed + number,
            resume=cfg.resume,
        )
    )
    accuracy = (report.get("eval") or {}).get("accuracy_accepted")
    return {
        "round": number,
        "teachers": len(teachers),
        "accepted": int(len(rows)),
        "pseudo_label_accuracy": accuracy,
        "val_accuracy": summary["best_val_accuracy"],
        "student": str(root / "distill" / "student"),
    }


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> None:
    from kdplug.reports.figures import new_figure, save_figure

    fig, ax = new_figure(figsize=(5, 3.5))
    ax.plot([r["round"] for r in rows], [r["val_accuracy"] for r in rows], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("student val accuracy")
    ax.set_xticks([r["round"] for r in rows])
    save_figure(fig, path)


@discarding_unstarted_runs()
def self_train(cfg: SelfTrainConfig, echo: Callable[[str], Any] = log.info) -> list[dict]:
    """Run ``cfg.rounds`` rounds into ``cfg.out``; return one table row per round."""
    from kdplug.data import load_data
    from kdplug.outputs import prepare_out_dir

    if cfg.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {cfg.rounds}")
    if not cfg.teachers:
        raise UsageError("self-train needs at least one --teacher")
    train = load_data(cfg.train)
    if train.classes is None or (train.labels() < 0).any():
        raise UsageError(f"{cfg.train}: every --train row needs a label")
    unlabeled = load_data(cfg.unlabeled)
    out = prepare_out_dir(
        cfg.out,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        marker=MARKER,
        config=cfg.record(),
        inputs=[*cfg.teachers, cfg.student, cfg.train, cfg.unlabeled, cfg.val],
    )
    teachers, rows = list(cfg.teachers), []
    for number in range(1, cfg.rounds + 1):
        echo(f"round {number}/{cfg.rounds}: {len(teachers)} teacher(s) label {cfg.unlabeled}")
        row = run_round(cfg, number, teachers, train, unlabeled, out / f"round-{number}")
        rows.append(row)
        echo(
            f"round {number}: {row['accepted']} pseudo-labels, student val accuracy "
            f"{row['val_accuracy']:.4f}"
        )
        student = student_teacher(out / f"round-{number}")
        teachers = [student] if cfg.replace else [*teachers, student]
    plot_rounds(rows, out / "rounds.png")
    write_json(out / SUMMARY, {"config": cfg.record(), "rounds": rows})
    return rows
