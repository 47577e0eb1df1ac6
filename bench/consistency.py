"""Consistency on unlabeled rows: `kd` with and without FixMatch, FixMatch against the labels.

bench/multi_teacher.py's data and unequal teachers (its functions, imported: digits at
16x16, 500 teacher rows, 150 labeled, 750 unlabeled, 397 test; a CNN, a forest, a logistic
regression and a bad one). The same timm student, epochs, lr and batch size as
multi_teacher's defaults, every run through ``kdplug.engines.distill``, three comparisons
over several seeds:

- ``kd``: ``kd`` with the ``auto`` combiner of all four teachers (multi_teacher's best
  setup (c)), against ``kd+consistency``: ``fixmatch,base=kd``, same teachers and combiner;
- ``ce``: the labels alone (``ce`` refuses ``--unlabeled``, whose rows it would not use),
  against ``consistency``: plain FixMatch (``fixmatch``, no teachers, the unlabeled rows
  as ``--unlabeled``);
- ``ce-steps``: ``ce`` trained for as many optimizer steps as ``consistency`` takes in
  ``--epochs`` (a FixMatch epoch is one pass over the unlabeled rows, 750 / 56 = 13 steps
  at batch 64 and mu 7; a labels-only epoch is 150 / 64 = 3), against ``consistency``
  too: the same number of updates, so the difference is not only more training;
- ``oracle-steps``: ``ce`` on the student's labeled and the unlabeled rows together, each
  with its true label, for as many steps as ``consistency`` (fully supervised, the
  reference SSL papers give): what the unlabeled rows would add if every one were labeled
  correctly, so how far above ``ce-steps`` any use of them can be expected to reach.

Both sides of each comparison use the same ``--augment`` weak view (digits are not mirror
symmetric: no flip), so the difference is the consistency term. Run:

    .venv/bin/python bench/consistency.py --out bench-results/consistency
    .venv/bin/python bench/consistency.py --out bench-results/consistency-40 --epochs 40 \\
        --runs ce-steps consistency
    .venv/bin/python bench/consistency.py --out bench-results/consistency-mu1 \\
        --runs ce ce-steps consistency --options mu=1 threshold=0.8

(settings docs/benchmarks.md reports). ``--per-class N`` gives the student only N labeled
rows of each class (the teachers keep theirs): where the labels alone are far from what
all the rows labeled would give, so the unlabeled rows have more to add.

``results.json`` and ``results.md`` are written to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multi_teacher  # noqa: E402  (bench/ is no package)

WEAK = "scale=0.8;1,ratio=0.9;1.1,hflip=0"
BATCH = 64


def distill_run(out: Path, test: str, **config) -> dict:
    """One ``kdplug distill`` run (``config``: DistillConfig's fields) and its student's
    accuracy on ``test``."""
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.eval import evaluate_student

    started = time.perf_counter()
    distill(DistillConfig(out=str(out), workers=0, overwrite=True, **config))
    accuracy = evaluate_student(str(out / "student"), test, workers=0)["accuracy"]
    return {"accuracy": accuracy, "seconds": time.perf_counter() - started}


def seed_runs(out: Path, test: str, name: str, seeds: list[int], **config) -> list[float]:
    """``distill_run`` once per seed (its ``seed``); the test accuracies, each printed."""
    accuracy = []
    for seed in seeds:
        run = distill_run(out, test, **config, seed=seed)
        accuracy.append(run["accuracy"])
        print(f"{name:<32} seed {seed}: {run['accuracy']:.4f} ({run['seconds']:.0f} s)")
    return accuracy


def consistency_spec(base: str | None) -> str:
    """``fixmatch`` (or ``--consistency``) on ``base`` with ``--options``."""
    parts = [ARGS.consistency] + ([f"base={base}"] if base else []) + ARGS.options
    return ",".join(parts)


def matched_epochs(unlabeled: int, labeled: int) -> int:
    """Epochs of labeled-only training with as many steps as ``--epochs`` of FixMatch."""
    spec = consistency_spec(None)
    from kdplug.plugins import create

    mu = create("losses", spec).unlabeled_ratio
    labeled_per_batch = min(max(1, round(BATCH / (1 + mu))), BATCH - 1)
    steps = max(1, unlabeled // (BATCH - labeled_per_batch)) * ARGS.epochs
    return math.ceil(steps / math.ceil(labeled / BATCH))


def all_labeled(splits: dict[str, str], root: Path) -> str:
    """The labeled and the unlabeled split as one split, every row with its true label."""
    from datasets import concatenate_datasets

    from kdplug.data import load_data

    parts = [load_data(splits[name]).dataset for name in ("labeled", "unlabeled")]
    concatenate_datasets(parts).save_to_disk(str(root))
    return multi_teacher.split_spec(root)


def fewer_labeled(splits: dict[str, str], per_class: int, root: Path) -> tuple[str, int]:
    """The first ``per_class`` rows of each class of the labeled split (a seeded shuffle),
    saved as a split of their own; its spec and its number of rows."""
    import numpy as np

    from kdplug.data import load_data

    dataset = load_data(splits["labeled"]).dataset
    labels = np.asarray(dataset["label"])
    order = np.random.default_rng(0).permutation(len(labels))
    keep = [i for c in np.unique(labels) for i in order[labels[order] == c][:per_class]]
    dataset.select(sorted(int(i) for i in keep)).save_to_disk(str(root))
    return multi_teacher.split_spec(root), len(keep)


def runs(teachers: list[str], oracle: str | None, labeled: int) -> dict[str, dict]:
    """The runs of ``--runs`` by name: DistillConfig fields beyond the shared ones
    (``oracle``: the split of ``all_labeled``, None when not asked for; ``labeled``: the
    student's labeled rows)."""
    with_teachers = {"teachers": teachers, "combiner": ARGS.combiner, "unlabeled": True}
    unlabeled = multi_teacher.SPLITS["unlabeled"]
    every = {
        "kd": {"loss": ARGS.kd, **with_teachers},
        "kd+consistency": {"loss": consistency_spec(ARGS.kd), **with_teachers},
        "ce": {"loss": "ce"},
        "ce-steps": {
            "loss": "ce",
            "epochs": matched_epochs(unlabeled, labeled),
        },
        "consistency": {"loss": consistency_spec(None), "unlabeled": True},
        "oracle-steps": {
            "loss": "ce",
            "train": oracle,
            "epochs": matched_epochs(unlabeled, labeled + unlabeled),
        },
    }
    return {name: every[name] for name in ARGS.runs}


RUNS = ["kd", "kd+consistency", "ce", "ce-steps", "consistency", "oracle-steps"]
COMPARISONS = [  # (baseline, with consistency, points the target asks for, or None)
    ("kd", "kd+consistency", 0.3),
    ("ce", "consistency", 2.0),
    ("ce-steps", "consistency", 2.0),
    ("ce-steps", "oracle-steps", None),
]


def markdown(results: dict) -> str:
    """results.md: the teachers, each run's accuracy, each comparison against its target."""
    mean_std = multi_teacher.mean_std
    lines = ["| teacher | labeled accuracy | test accuracy |", "|---|---|---|"]
    for name, entry in results["teachers"].items():
        lines.append(
            f"| {name} | {entry['labeled']['accuracy']:.3f} | {entry['test']['accuracy']:.3f} |"
        )
    seeds = len(results["seeds"])
    labeled = results["splits"]["labeled"]
    lines += ["", f"Student test accuracy over {seeds} seeds ({labeled} labeled rows):", ""]
    lines += ["| run | loss | epochs | mean ± std | per seed |", "|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        mean, std = mean_std(run["accuracy"])
        each = ", ".join(f"{a:.4f}" for a in run["accuracy"])
        lines.append(
            f"| {name} | `{run['loss']}` | {run['epochs']} | {mean:.4f} ± {std:.4f} | {each} |"
        )
    lines += ["", "| comparison | difference (points) | target | met |", "|---|---|---|---|"]
    for entry in results["comparisons"]:
        if entry["target"] is None:
            target, met = "(reference)", "—"
        else:
            target, met = f"≥ {entry['target']:+.1f}", "yes" if entry["met"] else "no"
        lines.append(
            f"| {entry['with']} − {entry['baseline']} | {entry['points']:+.2f} | {target} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    torch.set_num_threads(ARGS.threads)
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = multi_teacher.make_splits(out / "data")
    teachers = multi_teacher.make_teachers(out, splits, "unequal", seed=0)
    labeled = multi_teacher.SPLITS["labeled"]
    if ARGS.per_class:
        fewer = fewer_labeled(splits, ARGS.per_class, out / "data" / "fewer")
        splits["labeled"], labeled = fewer
    table = multi_teacher.teacher_accuracy(teachers, splits)
    seeds = list(range(ARGS.seeds))
    shared = {
        "student": ARGS.student,
        "train": splits["labeled"],
        "epochs": ARGS.epochs,
        "batch_size": BATCH,
        "lr": ARGS.lr,
        "augment": ARGS.augment,
    }
    results_runs = {}
    oracle = None
    if "oracle-steps" in ARGS.runs:
        oracle = all_labeled(splits, out / "data" / "all-labeled")
    for name, own in runs(list(teachers.values()), oracle, labeled).items():
        config = {**shared, **own}
        if config.get("unlabeled"):
            config["unlabeled"] = splits["unlabeled"]
        accuracy = seed_runs(out / "runs" / "student", splits["test"], name, seeds, **config)
        results_runs[name] = {"loss": config["loss"], "epochs": config["epochs"]}
        results_runs[name]["accuracy"] = accuracy
    comparisons = []
    for baseline, with_term, target in COMPARISONS:
        if baseline not in results_runs or with_term not in results_runs:
            continue
        points = 100 * (
            multi_teacher.mean_std(results_runs[with_term]["accuracy"])[0]
            - multi_teacher.mean_std(results_runs[baseline]["accuracy"])[0]
        )
        comparisons.append(
            {
                "baseline": baseline,
                "with": with_term,
                "points": points,
                "target": target,
                "met": None if target is None else points >= target,
            }
        )
    results = {
        "command": "python bench/consistency.py " + " ".join(ARGS.argv),
        "machine": multi_teacher.machine(ARGS.threads),
        "student": ARGS.student,
        "augment": ARGS.augment,
        "combiner": ARGS.combiner,
        "seeds": seeds,
        "splits": {**multi_teacher.SPLIT_SIZES, "labeled": labeled},
        "teacher_specs": teachers,
        "teachers": table,
        "runs": results_runs,
        "comparisons": comparisons,
        "seconds": time.perf_counter() - started,
    }
    multi_teacher.save_results(out, results, markdown(results))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/consistency")
    parser.add_argument("--student", default="timm:test_resnet")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--per-class",
        type=int,
        default=0,
        help="the student's labeled rows: this many of each class of the labeled split "
        "(default: all 150; the teachers keep theirs)",
    )
    parser.add_argument("--augment", default=WEAK, help="the weak view, on both sides")
    parser.add_argument("--combiner", default="auto")
    parser.add_argument("--kd", default="kd", help="the teachers' loss (consistency's base)")
    parser.add_argument(
        "--runs", nargs="+", choices=RUNS, default=RUNS, help="which runs (default: all)"
    )
    parser.add_argument("--consistency", default="fixmatch", help="fixmatch or flexmatch")
    parser.add_argument(
        "--options",
        nargs="*",
        default=[],
        help="options of the consistency loss, e.g. threshold=0.9 lambda_u=1",
    )
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    main()
