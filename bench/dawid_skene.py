"""``dawid-skene`` against ``mean`` on the unlabeled rows of bench/multi_teacher.py's setups.

For each teacher setup of bench/multi_teacher.py (``unequal``: a CNN on all 500 teacher
rows, a forest on 200, a logistic regression on 100 and a bad one on 200 with 45% of its
labels shifted; ``equal``: every teacher on 200 rows) and each seed (the split shuffle,
the teachers' rows and initializations), the four teachers are trained and run over the
750 unlabeled rows exactly as ``kdplug label`` runs them (``kdplug.engines.label.label_rows``
with the ``mean`` combiner). Every row is then labeled by the argmax of ``mean`` (the
combined prediction, no threshold) and by each ``dawid-skene`` variant of ``--variants``
(all rows accepted, ``tau=0``); the table gives the accuracy over all rows, mean ± std
over the seeds. The same teachers' outputs are also scored on a class-imbalanced subset of
those rows (row of class ``c`` kept with probability ``((c + 1) / 10)²``, seeded; about
290 rows), where the class priors that the EM learns matter. Run:

    .venv/bin/python bench/dawid_skene.py --out bench-results/dawid_skene

``results.json`` and ``results.md`` are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multi_teacher  # noqa: E402

MEAN = "mean (argmax)"
VARIANTS = [
    "dawid-skene,soft=false,init=vote,smoothing=0.01",
    "dawid-skene,soft=false,init=vote,smoothing=1",
    "dawid-skene,soft=false,init=mean,smoothing=0.01",
    "dawid-skene,soft=true,init=vote,smoothing=0.01",
    "dawid-skene,soft=true,init=vote,smoothing=0.1",
    "dawid-skene,soft=true,init=vote,smoothing=1",
    "dawid-skene,soft=true,init=mean,smoothing=0.01",
    "dawid-skene,soft=true,init=mean,smoothing=1",
    "dawid-skene",
]
SUBSETS = ("all", "imbalanced")


def teacher_outputs(specs: list[str], spec: str):
    """The teachers over the rows of ``spec`` as ``kdplug label`` runs them: each teacher's
    probabilities ``[K, N, C]``, ``known [K, C]``, the ``mean`` prediction ``[N, C]`` and
    the true labels ``[N]``."""
    import torch

    from kdplug.data import batches, load_data
    from kdplug.engines.label import label_rows
    from kdplug.plugins import create
    from kdplug.progress import Progress
    from kdplug.teachers import build_teacher_set

    source = load_data(spec)
    teachers = build_teacher_set(specs, source.classes)
    bar = Progress("label", None, show=False)
    cpu = torch.device("cpu")
    mean = create("combiners", "mean")
    rows = label_rows(
        batches(source, 256, workers=0), len(source), teachers, mean, cpu, bar, keep_probs=True
    )
    return rows["teacher_probs"], teachers.known.cpu(), rows["target"], source.labels()


def accuracies(variants: list[str], probs, known, target, truth) -> dict[str, float]:
    """All-rows accuracy of ``mean``'s argmax and of each generator variant's labels."""
    import numpy as np

    from kdplug.plugins import create

    def accuracy(label) -> float:
        return float((np.asarray(label) == truth).mean())

    scores = {MEAN: accuracy(target.argmax(1))}
    for spec in variants:
        scores[spec] = accuracy(create("label-generators", spec)(target, probs, known).label)
    return scores


def imbalanced(truth, seed: int, classes: int = 10):
    """``[N]`` bool: a row of class ``c`` kept with probability ``((c + 1) / classes)²``."""
    import numpy as np

    keep = ((truth + 1) / classes) ** 2
    return np.random.default_rng(seed).random(len(truth)) < keep


def run_setup(out: Path, setup: str, seed: int, variants: list[str]) -> dict:
    """Train one setup's teachers for one seed and score every labeling on its rows, and
    on the class-imbalanced subset of them."""
    root = out / setup / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    splits = multi_teacher.make_splits(root / "data", seed)
    specs = multi_teacher.make_teachers(root, splits, setup, seed)
    probs, known, target, truth = teacher_outputs(list(specs.values()), splits["unlabeled"])
    teachers = {
        name: float((probs[k].argmax(1).numpy() == truth).mean()) for k, name in enumerate(specs)
    }
    import torch

    keep = imbalanced(truth, seed)
    rows = torch.as_tensor(keep)
    labels = {
        "all": accuracies(variants, probs, known, target, truth),
        "imbalanced": accuracies(variants, probs[:, rows], known, target[rows], truth[keep]),
    }
    return {"teachers": teachers, "imbalanced_rows": int(keep.sum()), "labels": labels}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def markdown(results: dict) -> str:
    """Per setup and subset: every labeling's all-rows accuracy (mean ± std over seeds)."""
    setups = results["setups"]
    columns = [(s, subset) for subset in SUBSETS for s in setups]
    header = " | ".join(f"{s}" if subset == "all" else f"{s}, {subset}" for s, subset in columns)
    lines = [f"| labels (all rows) | {header} |", "|---" * (len(columns) + 1) + "|"]
    for name in [MEAN, *results["variants"]]:
        cells = [
            mean_std([run["labels"][subset][name] for run in results["runs"][s]])
            for s, subset in columns
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "| teacher (all rows) | " + " | ".join(setups) + " |"]
    lines.append("|---" * (len(setups) + 1) + "|")
    for name in results["runs"][setups[0]][0]["teachers"]:
        cells = [mean_std([run["teachers"][name] for run in results["runs"][s]]) for s in setups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    for setup in args.setups:
        runs[setup] = []
        for seed in range(args.seeds):
            run = run_setup(out, setup, seed, args.variants)
            runs[setup].append(run)
            print(f"{setup} seed {seed}: {json.dumps(run['labels'])}", flush=True)
    results = {
        "command": "python bench/dawid_skene.py " + " ".join(sys.argv[1:]),
        "machine": multi_teacher.machine(args.threads),
        "rows": multi_teacher.SPLITS["unlabeled"],
        "setups": args.setups,
        "seeds": list(range(args.seeds)),
        "variants": args.variants,
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    multi_teacher.save_results(out, results, markdown(results))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/dawid_skene")
    parser.add_argument("--setups", nargs="+", default=list(multi_teacher.TEACHER_ROWS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="dawid-skene specs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
