"""CIFAR-100 resnet32x4 -> resnet8x4 with mdistiller's recipes: KD, DKD, DKD + consistency,
ReviewKD, against the published numbers.

Needs a GPU and CIFAR-100 on local disk (nothing is downloaded): ``--train`` and ``--test``
are kdplug DATA specs of its two splits, e.g. ``disk:/data/cifar100/train`` (saved with
HF datasets' ``save_to_disk``: an image column and a ClassLabel label column) or
``imagefolder:/data/cifar100/train`` (one folder per class); with the hub's columns (``img``,
``fine_label``, ``coarse_label``) add ``label_column=fine_label``. Every run goes through
``kdplug.engines.distill`` as ``kdplug distill`` does:

1. the teacher ``cifar:resnet32x4`` with ``--loss ce`` (or ``--teacher DIR``: a student
   directory already trained), then
2. the student ``cifar:resnet8x4`` from it (``kdplug:`` teacher) with each loss of
   ``RECIPES``, for ``--seeds`` seeds, and alone (``ce``).

Recipe (mdistiller's configs/cifar100/*.yaml): 240 epochs, batch 64, SGD lr 0.05, momentum
0.9, weight decay 5e-4, lr x0.1 at epochs 150, 180, 210, crop + horizontal flip. Where
kdplug differs (crop, keeping the last epoch) is said in ``DIFFERENCES`` and
docs/benchmarks.md. Each student's accuracy is measured on ``--test`` after its last epoch
(``kdplug eval``'s). Run:

    .venv/bin/python bench/cifar100.py --train disk:/data/cifar100/train,label_column=fine_label \\
        --test disk:/data/cifar100/test,label_column=fine_label --device cuda \\
        --out bench-results/cifar100

``--smoke`` runs everything for 1 epoch on the first 256 rows of each split (a test of the
command, not a measurement). ``results.json`` and ``results.md`` are written to ``--out``,
the runs to ``--out/runs/`` (``teacher``, ``kd-seed0``, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multi_teacher  # noqa: E402  (bench/ is no package)

TEACHER = "cifar:resnet32x4"
STUDENT = "cifar:resnet8x4"
EPOCHS = 240
BATCH = 64
MU = 1  # DKD + consistency: unlabeled rows per labeled row in a batch
# mdistiller's SOLVER: SGD, lr 0.05 at batch 64, momentum 0.9, weight decay 5e-4, lr x0.1 at
# epochs 150, 180, 210 of 240 (timm's multistep; the milestones scale with --epochs)
TRAINING = {"opt": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "sched": "multistep"}
MILESTONES = (150, 180, 210)
DECAY_RATE = 0.1
# RandomCrop(32, padding=4) + RandomHorizontalFlip in timm's create_transform terms: a random
# square crop of 80-100% of the area resized back to 32x32, a flip, no color jitter
AUGMENT = "scale=0.8;1,ratio=1;1,hflip=0.5,color_jitter=0"
# name -> (loss spec, published top-1 %: mdistiller's README / DKD paper, Table 1)
RECIPES = {
    "student alone": ("ce", 72.50),
    "KD": ("kd,T=4,ce_weight=0.1,kd_weight=0.9", 73.33),
    "DKD": ("dkd,alpha=1,beta=8,T=4,warmup=20", 76.32),
    "DKD + consistency": (
        f"fixmatch,base=dkd,alpha=1,beta=8,T=4,warmup=20,threshold=0.95,lambda_u=1,mu={MU}",
        None,
    ),
    "ReviewKD": ("reviewkd,base=ce,stages=3,weight=5,warmup=20", 75.63),
}
TEACHER_PUBLISHED = 79.42
CONSISTENT = "DKD + consistency"  # the recipe that also reads the train rows as --unlabeled
SMOKE_ROWS = 256
DIFFERENCES = [
    "crop: timm's RandomResizedCrop(scale 0.8-1, ratio 1) for RandomCrop(32, padding=4)",
    "accuracy after the last epoch (mdistiller logs the best test accuracy over epochs)",
    "ReviewKD: the teacher's post-activation stage outputs (mdistiller: pre-activation)",
    f"DKD + consistency: no published number; the train rows again as --unlabeled (CIFAR-100 "
    f"is fully labeled), batch {BATCH * (1 + MU)} = {BATCH} labeled + {BATCH * MU} unlabeled",
]


def smoke_splits(train: str, test: str, root: Path) -> tuple[str, str]:
    """The first SMOKE_ROWS rows of each split saved under ``root``, as ``disk:`` specs
    with the given specs' options (``label_column=``, ``image_size=``; not ``split=``)."""
    from kdplug.data import load_data
    from kdplug.spec import Spec, parse_spec

    specs = []
    for name, spec in (("train", train), ("test", test)):
        dataset = load_data(spec).dataset
        path = root / name
        dataset.select(range(min(SMOKE_ROWS, len(dataset)))).save_to_disk(str(path))
        options = {k: v for k, v in parse_spec(spec).options.items() if k != "split"}
        specs.append(str(Spec.of("disk", str(path), **options)))
    return specs[0], specs[1]


def milestones(epochs: int) -> list[float]:
    """mdistiller's decay epochs scaled to a run of ``epochs`` (240: 150, 180, 210)."""
    return [epochs * m / EPOCHS for m in MILESTONES]


def run(out: Path, student: str, loss: str, seed: int, **options) -> dict:
    """One distill run with the recipe; the student's accuracy on ``--test``."""
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.eval import evaluate_student

    started = time.perf_counter()
    distill(
        DistillConfig(
            student=student,
            train=ARGS.train,
            out=str(out),
            loss=loss,
            epochs=ARGS.epochs,
            decay_milestones=milestones(ARGS.epochs),
            decay_rate=DECAY_RATE,
            augment=AUGMENT,
            keep="last",
            seed=seed,
            device=ARGS.device,
            workers=ARGS.workers,
            overwrite=True,
            **{"batch_size": BATCH, **TRAINING, **options},
        )
    )
    test = evaluate_student(
        str(out / "student"), ARGS.test, device=ARGS.device, workers=ARGS.workers
    )
    return {"accuracy": test["accuracy"], "seconds": time.perf_counter() - started}


def run_name(name: str) -> str:
    """A recipe's run directory name: ``DKD + consistency`` -> ``dkd-consistency``."""
    return "-".join(name.lower().replace("+", " ").split())


def student_options(name: str, teacher: str) -> dict:
    """The teachers (none for ``ce``) and, for DKD + consistency, the train rows as
    --unlabeled with a batch of BATCH labeled rows and BATCH * MU unlabeled."""
    options = {"teachers": [] if name == "student alone" else [f"kdplug:{teacher}"]}
    if name == CONSISTENT:
        options.update(unlabeled=ARGS.train, batch_size=BATCH * (1 + MU))
    return options


def markdown(results: dict) -> str:
    """The table of results.md: each recipe's mean ± std top-1 against the published."""
    seeds = len(results["seeds"])
    lines = [
        f"CIFAR-100 test top-1 (%), {results['epochs']} epochs, mean ± std over {seeds} seed(s)"
        + (" — SMOKE RUN, not a measurement" if results["smoke"] else ""),
        "",
        "| model | loss | published | measured |",
        "|---|---|---|---|",
        f"| teacher {results['teacher']['model']} | `ce` | {TEACHER_PUBLISHED:.2f} "
        f"| {100 * results['teacher']['accuracy']:.2f} |",
    ]
    for name, entry in results["students"].items():
        mean, std = multi_teacher.mean_std([100 * a for a in entry["accuracy"]])
        published = "—" if entry["published"] is None else f"{entry['published']:.2f}"
        lines.append(
            f"| {results['student_model']} {name} | `{entry['loss']}` | {published} "
            f"| {mean:.2f} ± {std:.2f} |"
        )
    lines += ["", "Differences from mdistiller's recipe:", ""]
    lines += [f"- {line}" for line in DIFFERENCES]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if ARGS.smoke:
        ARGS.train, ARGS.test = smoke_splits(ARGS.train, ARGS.test, out / "data")
    teacher = ARGS.teacher
    if teacher is None:
        teacher = str(out / "runs" / "teacher")
        run(Path(teacher), ARGS.teacher_model, "ce", 0)
    from kdplug.engines.eval import evaluate_student

    teacher_test = evaluate_student(teacher, ARGS.test, device=ARGS.device, workers=ARGS.workers)
    print(f"teacher {ARGS.teacher_model}: {teacher_test['accuracy']:.4f}")
    seeds = list(range(ARGS.seeds))
    students = {}
    for name, (loss, published) in RECIPES.items():
        accuracy = []
        for seed in seeds:
            options = student_options(name, teacher)
            where = out / "runs" / f"{run_name(name)}-seed{seed}"
            result = run(where, ARGS.student_model, loss, seed, **options)
            accuracy.append(result["accuracy"])
            print(f"{name:>18} seed {seed}: {result['accuracy']:.4f} ({result['seconds']:.0f} s)")
        students[name] = {"loss": loss, "published": published, "accuracy": accuracy}
    results = {
        "command": "python bench/cifar100.py " + " ".join(ARGS.argv),
        "machine": multi_teacher.machine(torch.get_num_threads()),
        "smoke": ARGS.smoke,
        "device": ARGS.device,
        "epochs": ARGS.epochs,
        "seeds": seeds,
        "recipe": {
            "batch_size": BATCH,
            **TRAINING,
            "decay_milestones": milestones(ARGS.epochs),
            "decay_rate": DECAY_RATE,
            "augment": AUGMENT,
        },
        "differences": DIFFERENCES,
        "teacher": {
            "model": ARGS.teacher_model if ARGS.teacher is None else ARGS.teacher,
            "dir": teacher,
            "accuracy": teacher_test["accuracy"],
        },
        "student_model": ARGS.student_model,
        "students": students,
        "seconds": time.perf_counter() - started,
    }
    multi_teacher.save_results(out, results, markdown(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="DATA spec of CIFAR-100's train split")
    parser.add_argument("--test", required=True, help="DATA spec of CIFAR-100's test split")
    parser.add_argument("--out", default="bench-results/cifar100")
    parser.add_argument("--teacher", help="a trained resnet32x4 student directory (skip step 1)")
    parser.add_argument("--teacher-model", default=TEACHER, help="the teacher trained in step 1")
    parser.add_argument("--student-model", default=STUDENT)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (kdplug's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="1 epoch on the first 256 rows")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    main()
