"""Multi-teacher distillation on digits: the best teacher alone, ``mean`` of all, ``auto``.

scikit-learn's bundled digits (1797 8x8 images), upsampled to 16x16 by the data path
(``image_size=16``), split once into teacher-training rows, the student's labeled rows,
unlabeled rows and test rows. Four teachers of clearly different quality, as in the issue
that asked for ``auto`` (0.94 / 0.91 / 0.88): a small torch CNN (TorchScript) trained on
all the teacher rows, a random forest on a random 200 of them, a logistic regression on
100, and a deliberately bad logistic regression on 200 with 45% of its labels shifted to
the next class (the three scikit-learn ones as .skops files). A timm student is then
distilled from (a) the teacher with the best accuracy on the labeled rows alone, (b)
``mean`` of all four, (c) ``auto`` of all four, with KD and with DKD at their default T
and at the other temperatures of ``--losses`` (what the default T is chosen from), for
several seeds; every run goes through ``kdplug.engines.distill`` exactly as ``kdplug distill``
does. The T that ``T=auto`` would choose for each setup is reported too. ``--teachers
equal`` trains every teacher on 200 rows instead (the three good ones then end up about
as accurate). Run:

    .venv/bin/python bench/multi_teacher.py --out bench-results/multi_teacher
    .venv/bin/python bench/multi_teacher.py --out bench-results/multi_teacher-equal --teachers equal

``results.json``, ``results.md`` and ``multi_teacher.png`` are written to ``--out``.
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

SIZE = 16
SPLITS = {"teacher": 500, "labeled": 150, "unlabeled": 750}  # the remaining 397 rows: test
# how many of the teacher rows each teacher trains on (its own random subset), per --teachers:
# "unequal" (the default) gives the CNN all of them, so quality differs clearly; "equal"
# gives every teacher 200, so the three good ones end up about as accurate
TEACHER_ROWS = {
    "unequal": {"cnn": SPLITS["teacher"], "forest": 200, "logreg": 100, "bad": 200},
    "equal": {"cnn": 200, "forest": 200, "logreg": 200, "bad": 200},
}
# the rows of each split, the test split being what the others leave of digits' 1797
SPLIT_SIZES = {**SPLITS, "test": 1797 - sum(SPLITS.values())}
SHIFTED = 0.45  # fraction of the bad teacher's training labels moved to the next class


def make_splits(root: Path, seed: int = 0) -> dict[str, str]:
    """The digits saved to disk in four disjoint splits (a ``seed``-ed shuffle); DATA specs
    at SIZE x SIZE."""
    import numpy as np

    from kdplug.data import load_data

    dataset = load_data("sklearn:digits").dataset
    order = np.random.default_rng(seed).permutation(len(dataset))
    specs, start = {}, 0
    for name, count in [*SPLITS.items(), ("test", len(dataset) - sum(SPLITS.values()))]:
        rows = sorted(order[start : start + count].tolist())
        start += count
        path = root / name
        dataset.select(rows).save_to_disk(str(path))
        specs[name] = split_spec(path)
    return specs


def split_spec(path: Path) -> str:
    """The DATA spec of a split saved at ``path``, read at SIZE x SIZE."""
    return f"disk:{path},image_size={SIZE}"


def load_arrays(spec: str):
    """All rows of a split as the teachers see them: ``x [N, 1, SIZE, SIZE]``, ``y [N]``."""
    from kdplug.data import load_data

    source = load_data(spec)
    x, y, _ = source.batch(list(range(len(source))))
    return x, y


def train_cnn(x, y, path: Path, epochs: int = 40, seed: int = 0) -> None:
    """A two-layer CNN trained with Adam on ``x``, saved as TorchScript."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (SIZE // 4) ** 2, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
            optimizer.step()
    net.eval()
    torch.jit.save(torch.jit.trace(net, x[:2]), str(path))


def make_teachers(
    root: Path, splits: dict[str, str], setup: str | None = None, seed: int = 0
) -> dict[str, str]:
    """The four teachers, trained on the teacher split (``setup``: a key of TEACHER_ROWS,
    default ``--teachers``; ``seed`` picks their rows and initializations); name -> spec."""
    import numpy as np
    import skops.io
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    x, y = load_arrays(splits["teacher"])
    rng = np.random.default_rng(seed)
    cnn, forest, logreg, bad = (
        rng.choice(len(x), rows, replace=False)
        for rows in TEACHER_ROWS[setup or ARGS.teachers].values()
    )
    train_cnn(x[cnn], y[cnn], root / "cnn.pt", seed=seed)
    rows, labels = x.flatten(1).numpy(), y.numpy()
    shifted = labels.copy()
    moved = rng.random(len(labels)) < SHIFTED
    shifted[moved] = (shifted[moved] + 1) % 10
    estimators = {
        "forest": RandomForestClassifier(n_estimators=100, random_state=seed).fit(
            rows[forest], labels[forest]
        ),
        "logreg": LogisticRegression(max_iter=1000).fit(rows[logreg], labels[logreg]),
        "bad": LogisticRegression(max_iter=1000).fit(rows[bad], shifted[bad]),
    }
    specs = {"cnn": f"torchscript:{root / 'cnn.pt'},allow_code=true"}  # our own program
    for name, estimator in estimators.items():
        skops.io.dump(estimator, root / f"{name}.skops")
        specs[name] = f"sklearn:{root / name}.skops"
    specs["forest"] += ",trusted=sklearn.tree._tree.Tree"  # a forest's trees: a type we trust
    return specs


def teacher_accuracy(specs: dict[str, str], splits: dict[str, str]) -> dict[str, dict]:
    """Each teacher's accuracy and NLL on the labeled and the test split."""
    from kdplug.engines.teachers import report

    table: dict[str, dict] = {name: {} for name in specs}
    for split in ("labeled", "test"):
        result = report(list(specs.values()), splits[split])
        for name, entry in zip(specs, result["teachers"]):
            table[name][split] = {"accuracy": entry["accuracy"], "nll": entry["nll"]}
    return table


def run_student(
    out: Path, splits: dict[str, str], teachers: list[str], combiner: str, loss: str, seed: int
) -> dict:
    """One distillation through the engine; the student's test accuracy and the fit."""
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.eval import evaluate_student

    started = time.perf_counter()
    summary = distill(
        DistillConfig(
            student=ARGS.student,
            train=splits["labeled"],
            unlabeled=splits["unlabeled"],
            teachers=teachers,
            out=str(out),
            loss=loss,
            combiner=combiner,
            epochs=ARGS.epochs,
            batch_size=64,
            lr=ARGS.lr,
            seed=seed,
            workers=0,
            overwrite=True,
        )
    )
    test = evaluate_student(str(out / "student"), splits["test"], workers=0)
    return {
        "accuracy": test["accuracy"],
        "fitted": summary.get("fitted", {}),
        "seconds": time.perf_counter() - started,
    }


def auto_temperatures(splits: dict[str, str], setups: dict[str, tuple]) -> dict[str, dict]:
    """What ``kd,T=auto`` would choose for each setup (no student is trained)."""
    from kdplug.data import load_data
    from kdplug.fitting import choose_temperature, fit_components
    from kdplug.plugins import create
    from kdplug.teachers import build_teacher_set

    source = load_data(splits["labeled"])
    choices = {}
    for setup, (specs, combiner_spec) in setups.items():
        teachers = build_teacher_set(specs, source.classes)
        x, y, idx = source.batch(list(range(len(source))))
        out = teachers(x, idx)
        combiner = create("combiners", combiner_spec)
        fit_components(combiner, None, out.logits, out.known, y)
        choice = choose_temperature(combiner, out.logits, out.known, y)
        choices[setup] = choice
        print(f"T=auto for {setup}: {choice['T']:g} {choice['held_out_nll']}")
    return choices


def column(loss: str) -> str:
    """A loss spec as a table header; a default temperature is spelled out."""
    from kdplug.plugins import create

    if "T=" in loss:
        return f"`{loss}`"
    return f"`{loss}` (default T = {create('losses', loss).temperature:g})"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(results: dict) -> str:
    """The tables of results.md (also pasted into docs/benchmarks.md)."""
    lines = ["| teacher | labeled accuracy | test accuracy | test NLL |", "|---|---|---|---|"]
    for name, entry in results["teachers"].items():
        lines.append(
            f"| {name} | {entry['labeled']['accuracy']:.3f} | {entry['test']['accuracy']:.3f} "
            f"| {entry['test']['nll']:.3f} |"
        )
    seeds = len(results["seeds"])
    lines += ["", f"Student test accuracy, mean ± std over {seeds} seeds:", ""]
    losses = list(results["students"])
    header = " | ".join(column(loss) for loss in losses)
    lines += [f"| teachers | {header} |", "|---" * (len(losses) + 1) + "|"]
    for setup in results["setups"]:
        cells = []
        for loss in losses:
            mean, std = mean_std(results["students"][loss][setup])
            cells.append(f"{mean:.4f} ± {std:.4f}")
        lines.append(f"| {setup} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The T that `T=auto` chooses (held-out NLL of the tempered target, labeled rows):",
        "",
    ]
    lines += ["| teachers | T | held-out NLL at T = 1, 2, 4 |", "|---|---|---|"]
    for setup, choice in results["auto_temperature"].items():
        nll = ", ".join(f"{choice['held_out_nll'][t]:.3f}" for t in ("1", "2", "4"))
        lines.append(f"| {setup} | {choice['T']:g} | {nll} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    """Bars: the student's mean test accuracy (± std) per setup and loss."""
    from kdplug.reports.figures import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4))
    losses, setups = list(results["students"]), results["setups"]
    width = 0.8 / len(setups)
    for i, setup in enumerate(setups):
        stats = [mean_std(results["students"][loss][setup]) for loss in losses]
        ax.bar(
            [j + i * width for j in range(len(losses))],
            [m for m, _ in stats],
            width,
            yerr=[s for _, s in stats],
            capsize=3,
            label=setup,
        )
    ax.set_xticks([j + width * (len(setups) - 1) / 2 for j in range(len(losses))], losses)
    low = min(min(v) for per in results["students"].values() for v in per.values())
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("student test accuracy")
    ax.set_title(f"digits {SIZE}x{SIZE}, {ARGS.student}, {ARGS.epochs} epochs")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main() -> None:
    import torch

    torch.set_num_threads(ARGS.threads)
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = make_splits(out / "data")
    teachers = make_teachers(out, splits)
    print(f"teachers trained ({time.perf_counter() - started:.0f} s)")
    table = teacher_accuracy(teachers, splits)
    best = max(table, key=lambda name: table[name]["labeled"]["accuracy"])
    print(json.dumps(table, indent=1))
    print(f"best teacher on the labeled rows: {best}")
    everyone = list(teachers.values())
    setups = {
        f"(a) best alone ({best})": ([teachers[best]], "mean"),
        "(b) mean of all": (everyone, "mean"),
        f"(c) {ARGS.auto} of all": (everyone, ARGS.auto),
    }
    seeds = list(range(ARGS.seeds))
    students: dict[str, dict[str, list[float]]] = {}
    fits: dict[str, dict] = {}
    for loss in ARGS.losses:
        students[loss] = {}
        for setup, (specs, combiner) in setups.items():
            students[loss][setup] = []
            for seed in seeds:
                run = run_student(out / "runs" / "student", splits, specs, combiner, loss, seed)
                students[loss][setup].append(run["accuracy"])
                if run["fitted"]:
                    fits[f"{loss} {setup} seed {seed}"] = run["fitted"]
                seconds = run["seconds"]
                print(f"{loss:>8} {setup:<28} seed {seed}: {run['accuracy']:.4f} ({seconds:.0f} s)")
    temperatures = auto_temperatures(splits, setups)
    results = {
        "command": "python bench/multi_teacher.py " + " ".join(ARGS.argv),
        "machine": machine(ARGS.threads),
        "student": ARGS.student,
        "epochs": ARGS.epochs,
        "seeds": seeds,
        "splits": SPLIT_SIZES,
        "teacher_rows": TEACHER_ROWS[ARGS.teachers],
        "teacher_specs": teachers,
        "teachers": table,
        "best_teacher": best,
        "setups": list(setups),
        "students": students,
        "auto_temperature": temperatures,
        "fits": fits,
        "seconds": time.perf_counter() - started,
    }
    save_results(out, results, markdown(results))
    figure(results, out / "multi_teacher.png")
    print(f"and {out}/multi_teacher.png")


def machine(threads: int) -> dict:
    """The machine a benchmark ran on, as results.json records it."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
    }


def save_results(out: Path, results: dict, table: str) -> None:
    """Write ``results.json`` and ``results.md`` (``table``) to ``out`` and print the table."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    print(table)
    print(f"total {results['seconds']:.0f} s; wrote {out}/results.json and results.md")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/multi_teacher")
    parser.add_argument(
        "--teachers",
        choices=list(TEACHER_ROWS),
        default="unequal",
        help="how many teacher rows each teacher trains on (see TEACHER_ROWS)",
    )
    parser.add_argument(
        "--auto", default="auto", help="the combiner spec of setup (c), e.g. auto,reg=10"
    )
    parser.add_argument("--student", default="timm:test_resnet")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a busy 2-core machine more threads run much slower)",
    )
    parser.add_argument(
        "--losses",
        nargs="+",
        default=["kd", "kd,T=1", "kd,T=4", "dkd", "dkd,T=1", "dkd,T=4"],
        help="loss specs, one column each (kd and dkd alone: their default T)",
    )
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    main()
