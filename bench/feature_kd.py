"""Feature distillation: `fitnet` and `reviewkd` on `kd` against `kd` alone, a timm teacher.

bench/multi_teacher.py's digits split (its ``make_splits``: 500 teacher rows, 150 labeled,
750 unlabeled, 397 test), upsampled to 32x32 by the data path. The teacher, a timm
``resnet18`` (one input channel, 11.2 M parameters), is trained here with ``kdplug distill
--loss ce`` on the teacher rows and then served as a ``kdplug:`` teacher, whose
intermediate features (timm's ``forward_intermediates``) the feature losses read. A small
timm student (``test_resnet`` by default, 0.37 M parameters, other stage widths than the
teacher's: the losses' projectors map them) is distilled from it on the labeled and
unlabeled rows with each of ``--losses``, for several seeds; the student on the labeled
rows alone is measured too, for scale. Every run goes through ``kdplug.engines.distill``.
Run:

    .venv/bin/python bench/feature_kd.py --out bench-results/feature_kd

``results.json`` and ``results.md`` are written to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multi_teacher  # noqa: E402  (bench/ is no package)
from consistency import distill_run, seed_runs  # noqa: E402

BATCH = 64


def upsampled(splits: dict[str, str], size: int) -> dict[str, str]:
    """multi_teacher's split specs at ``size`` x ``size`` instead of its SIZE."""
    old = f"image_size={multi_teacher.SIZE}"
    return {name: spec.replace(old, f"image_size={size}") for name, spec in splits.items()}


def train_teacher(out: Path, splits: dict[str, str]) -> tuple[str, float]:
    """The timm teacher trained on the teacher rows (labels only): its spec, test accuracy."""
    run = distill_run(
        out,
        splits["test"],
        student=f"timm:{ARGS.teacher}",
        train=splits["teacher"],
        loss="ce",
        epochs=ARGS.teacher_epochs,
        batch_size=BATCH,
        lr=ARGS.lr,
        seed=0,
    )
    print(f"teacher {ARGS.teacher}: test accuracy {run['accuracy']:.4f} ({run['seconds']:.0f} s)")
    return f"kdplug:{out}", run["accuracy"]


def markdown(results: dict) -> str:
    """results.md: the teacher, then each loss's student accuracy."""
    mean_std = multi_teacher.mean_std
    seeds = len(results["seeds"])
    lines = [
        f"Teacher timm `{results['teacher']}` (trained on the {results['splits']['teacher']} "
        f"teacher rows, {results['teacher_epochs']} epochs): test accuracy "
        f"{results['teacher_accuracy']:.4f}.",
        "",
        f"Student `{results['student']}`, {results['epochs']} epochs, test accuracy over "
        f"{seeds} seeds:",
        "",
        "| loss | mean ± std | against `kd` (points) | per seed |",
        "|---|---|---|---|",
    ]
    kd = mean_std(results["students"]["kd"])[0] if "kd" in results["students"] else None
    for loss, accuracy in results["students"].items():
        mean, std = mean_std(accuracy)
        against = f"{100 * (mean - kd):+.2f}" if kd is not None and loss != "kd" else ""
        each = ", ".join(f"{a:.4f}" for a in accuracy)
        lines.append(f"| `{loss}` | {mean:.4f} ± {std:.4f} | {against} | {each} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    torch.set_num_threads(ARGS.threads)
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = upsampled(multi_teacher.make_splits(out / "data"), ARGS.size)
    teacher, teacher_accuracy = train_teacher(out / "teacher", splits)
    shared = {
        "student": ARGS.student,
        "train": splits["labeled"],
        "epochs": ARGS.epochs,
        "batch_size": BATCH,
        "lr": ARGS.lr,
    }
    with_teacher = {"teachers": [teacher], "unlabeled": splits["unlabeled"]}
    students: dict[str, list[float]] = {}
    for loss in ["ce", *ARGS.losses]:
        own = {} if loss == "ce" else with_teacher
        students[loss] = seed_runs(
            out / "runs" / "student",
            splits["test"],
            loss,
            list(range(ARGS.seeds)),
            **shared,
            **own,
            loss=loss,
        )
    results = {
        "command": "python bench/feature_kd.py " + " ".join(ARGS.argv),
        "machine": multi_teacher.machine(ARGS.threads),
        "size": ARGS.size,
        "teacher": ARGS.teacher,
        "teacher_epochs": ARGS.teacher_epochs,
        "teacher_accuracy": teacher_accuracy,
        "student": ARGS.student,
        "epochs": ARGS.epochs,
        "lr": ARGS.lr,
        "seeds": list(range(ARGS.seeds)),
        "splits": multi_teacher.SPLIT_SIZES,
        "students": students,
        "seconds": time.perf_counter() - started,
    }
    multi_teacher.save_results(out, results, markdown(results))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/feature_kd")
    parser.add_argument("--size", type=int, default=32, help="the digits' upsampled size")
    parser.add_argument("--teacher", default="resnet18", help="a timm architecture")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student", default="timm:test_resnet")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--losses",
        nargs="+",
        default=["kd", "fitnet,base=kd", "reviewkd,base=kd"],
        help="loss specs with the teacher ('ce', the labels alone, always runs first)",
    )
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    main()
