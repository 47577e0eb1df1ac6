"""The tabular student: a distilled ``tabular:mlp`` against the same MLP on the labels alone.

scikit-learn's breast_cancer (569 rows, 30 features, 2 classes), split anew per seed
(stratified): 30% test rows that nothing is fitted or selected on, and of the rest
``--labeled`` rows with labels, the others an unlabeled pool written without its labels.
Four scikit-learn teachers are fitted on the labeled rows alone (or, with
``--teacher-labeled N``, on N labeled rows that hold the student's: teachers trained on
more labels than the student gets, the student seeing the others without their labels)
and saved as ``.skops``:
a logistic regression and a k-nearest-neighbours classifier (each after a StandardScaler),
a random forest and gradient boosting. Then, through kdplug's engine exactly as ``kdplug
distill`` runs it (``kdplug.engines.distill``): the MLP distilled from the four teachers
over the labeled and unlabeled rows (the default loss ``kd`` and combiner ``auto``), and
the same MLP (same epochs, batch and lr) on the labeled rows alone (``--loss ce``), and,
for information, on the labeled rows alone with as many optimizer steps as distill takes,
and the teachers' mean probabilities (distill's target here: ``auto`` falls back to
``mean`` when the teachers look trained on the labeled rows, as they are).
Every student is scored by ``kdplug.engines.eval.evaluate_student`` on the test rows.
Target: the distilled MLP's mean test accuracy over the seeds ≥ the labels-only one's.
Run:

    .venv/bin/python bench/tabular_student.py --out bench-results/tabular_student

``results.json`` and ``results.md`` are written to ``--out``; ``--json`` prints the results
as JSON instead of the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

TEACHERS = ("logreg", "knn", "forest", "boosting")
TREES = "trusted=sklearn.tree._tree.Tree"  # skops' opt-in for the tree ensembles' type


def split_rows(seed: int, labeled: int, teacher_labeled: int):
    """breast_cancer's features, labels, feature names and the row indices of the test,
    teachers' (``teacher_labeled`` rows, the student's ``labeled`` among them), labeled and
    unlabeled rows (stratified, ``seed``-ed); the teachers' rows the student has no labels
    for are in its unlabeled pool."""
    import numpy as np
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    rows = np.arange(len(data.target))
    rest, test = train_test_split(rows, test_size=0.3, stratify=data.target, random_state=seed)
    teacher_rows = rest
    if teacher_labeled < len(rest):
        teacher_rows, _ = train_test_split(
            rest, train_size=teacher_labeled, stratify=data.target[rest], random_state=seed
        )
    labeled_rows = teacher_rows
    if labeled < len(teacher_rows):
        labeled_rows, _ = train_test_split(
            teacher_rows, train_size=labeled, stratify=data.target[teacher_rows], random_state=seed
        )
    unlabeled_rows = np.setdiff1d(rest, labeled_rows)
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    return (
        data.data,
        data.target,
        names,
        {
            "test": test,
            "teachers": teacher_rows,
            "labeled": labeled_rows,
            "unlabeled": unlabeled_rows,
        },
    )


def write_csv(path: Path, x, y, names: list[str]) -> str:
    """Rows as a CSV file (a ``label`` column when ``y`` is given); its DATA spec."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*names, *(["label"] if y is not None else [])])
        for i, row in enumerate(x):
            writer.writerow([*(f"{v:.6g}" for v in row), *([int(y[i])] if y is not None else [])])
    return f"csv:{path}"


def fit_teachers(x, y, root: Path, seed: int) -> dict[str, str]:
    """The four teachers fitted on the labeled rows, saved with skops; their specs."""
    import skops.io
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    models = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5)),
        "forest": RandomForestClassifier(n_estimators=200, random_state=seed),
        "boosting": GradientBoostingClassifier(random_state=seed),
    }
    specs = {}
    for name, model in models.items():
        path = root / f"{name}.skops"
        skops.io.dump(model.fit(x, y), path)
        trusted = f",{TREES}" if name in ("forest", "boosting") else ""
        specs[name] = f"sklearn:{path}{trusted}"
    return specs


def teacher_probs(spec: str, test: str):
    """A teacher's probabilities ``[N, C]`` on the test rows, run as kdplug runs it, and
    the rows' labels ``[N]``."""
    import torch

    from kdplug.data import batches, load_data
    from kdplug.plugins import create

    teacher, source = create("teachers", spec), load_data(test)
    probs, labels = [], []
    for x, y, _ in batches(source, 256, workers=0):
        probs.append(torch.softmax(teacher(x).float(), -1))
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def accuracy(probs, labels) -> float:
    return float((probs.argmax(1) == labels).float().mean())


def run_student(out: Path, data: dict[str, str], seed: int, epochs: int, **what) -> float:
    """One MLP trained through distill's engine; its test accuracy."""
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.eval import evaluate_student

    distill(
        DistillConfig(
            student=ARGS.student,
            train=data["labeled"],
            out=str(out),
            epochs=epochs,
            batch_size=ARGS.batch_size,
            lr=ARGS.lr,
            seed=seed,
            workers=0,
            overwrite=True,
            **what,
        )
    )
    return evaluate_student(str(out / "student"), data["test"], workers=0)["accuracy"]


def one_seed(root: Path, seed: int) -> dict:
    """Teachers, the distilled MLP and the labels-only MLPs of one split."""
    x, y, names, rows = split_rows(seed, ARGS.labeled, max(ARGS.labeled, ARGS.teacher_labeled))
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "labeled": write_csv(root / "labeled.csv", x[rows["labeled"]], y[rows["labeled"]], names),
        "unlabeled": write_csv(root / "unlabeled.csv", x[rows["unlabeled"]], None, names),
        "test": write_csv(root / "test.csv", x[rows["test"]], y[rows["test"]], names),
    }
    teachers = fit_teachers(x[rows["teachers"]], y[rows["teachers"]], root, seed)
    outputs = {name: teacher_probs(spec, data["test"]) for name, spec in teachers.items()}
    result = {name: accuracy(*out) for name, out in outputs.items()}
    # what distill's target is here: `auto` falls back to `mean` (the teachers look
    # trained on the labeled rows), equal weights on the teachers' probabilities
    labels = next(iter(outputs.values()))[1]
    result["teacher_mean"] = accuracy(sum(p for p, _ in outputs.values()) / len(outputs), labels)
    result["distilled"] = run_student(
        root / "distilled",
        data,
        seed,
        ARGS.epochs,
        teachers=list(teachers.values()),
        unlabeled=data["unlabeled"],
    )
    result["labels_only"] = run_student(root / "labels", data, seed, ARGS.epochs, loss="ce")
    all_rows = len(rows["labeled"]) + len(rows["unlabeled"])
    steps = ARGS.epochs * (all_rows // ARGS.batch_size)
    same_steps = max(1, round(steps / (len(rows["labeled"]) // ARGS.batch_size)))
    result["labels_only_same_steps"] = run_student(
        root / "labels-steps", data, seed, same_steps, loss="ce"
    )
    result["rows"] = {k: len(v) for k, v in rows.items()}
    result["labels_only_same_steps_epochs"] = same_steps
    return result


COLUMNS = (*TEACHERS, "teacher_mean", "distilled", "labels_only", "labels_only_same_steps")
HEADERS = (
    *TEACHERS,
    "teachers' mean",
    "distilled MLP",
    "MLP, labels only",
    "MLP, labels only, distill's steps",
)


def markdown(results: dict) -> str:
    """The test accuracies: one row per seed, then the mean; the target line."""
    seeds = results["seeds"]
    lines = [
        "| seed | " + " | ".join(HEADERS) + " |",
        "|---|" + "---|" * len(HEADERS),
    ]
    for seed, row in seeds.items():
        lines.append(f"| {seed} | " + " | ".join(f"{row[c]:.4f}" for c in COLUMNS) + " |")
    means = {c: statistics.mean(row[c] for row in seeds.values()) for c in COLUMNS}
    lines.append("| mean | " + " | ".join(f"**{means[c]:.4f}**" for c in COLUMNS) + " |")
    met = "met" if results["target_met"] else "NOT met"
    lines.append("")
    lines.append(
        f"Target (distilled ≥ labels only, mean over {len(seeds)} seeds): {met} "
        f"({means['distilled']:.4f} vs {means['labels_only']:.4f})."
    )
    return "\n".join(lines) + "\n"


def machine(threads: int) -> dict:
    """The machine the benchmark ran on, as results.json records it."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch_threads": threads,
        "torch": torch.__version__,
    }


def main() -> None:
    import torch

    torch.set_num_threads(ARGS.threads)
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = {}
    for seed in range(ARGS.seeds):
        seeds[seed] = one_seed(out / f"seed-{seed}", seed)
        if not ARGS.json:
            print(f"seed {seed}: {json.dumps({c: round(seeds[seed][c], 4) for c in COLUMNS})}")
    distilled = statistics.mean(row["distilled"] for row in seeds.values())
    alone = statistics.mean(row["labels_only"] for row in seeds.values())
    results = {
        "argv": sys.argv[1:],
        "config": {k: v for k, v in vars(ARGS).items()},
        "seeds": seeds,
        "target_met": distilled >= alone,
        "seconds": time.perf_counter() - started,
        "machine": machine(ARGS.threads),
    }
    table = markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(table)
    if ARGS.json:
        print(json.dumps(results, indent=1, default=str))
    else:
        print(table)
        print(f"total {results['seconds']:.0f} s; wrote {out}/results.json and results.md")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/tabular_student")
    parser.add_argument("--student", default="tabular:mlp", help="the student spec")
    parser.add_argument("--labeled", type=int, default=60, help="labeled rows (of 398)")
    parser.add_argument(
        "--teacher-labeled",
        type=int,
        default=0,
        help="the teachers are fitted on this many labeled rows, the student's among them "
        "(the rest in the student's unlabeled pool, without labels); default: the student's",
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print results.json, not the table")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    main()
