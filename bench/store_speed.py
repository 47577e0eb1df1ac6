"""Teacher store vs live teachers: epoch time, student accuracy and bytes per stored entry.

One run, the same student, data, batches and epochs for four ways of training it:

(a) the student alone on the labels (``--loss ce``);
(b) live KD from 1 teacher; (c) live KD from 3 teachers;
(d) KD from a store (``kdplug cache``, top-k in float16) of the same 3 teachers.

All rows of the train split are labeled, so every run sees the same rows per epoch. The
teachers are timm models trained here by ``kdplug distill --loss ce`` (more epochs than
the students). The four runs are repeated ``--repeats`` times in alternation (seed
``--seed + round``), so a machine whose load drifts slows them alike. Epoch times are the
engine's own (``summary.json``): the median over every round's epochs after the first
(warm-up). Accuracy is the kept student's on the test split, averaged over the rounds.
The store's size is its arrays on disk divided by rows x teachers x views. Run on CPU:

    OMP_NUM_THREADS=1 .venv/bin/python bench/store_speed.py --json store_speed.json

``--tiny`` runs the same on a few hundred 8x8 rows with tiny models, for CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import kdplug


def make_splits(root: Path, size: int, train_rows: int, test_rows: int, seed: int) -> dict:
    """Disjoint train / test splits of scikit-learn digits (DATA specs at ``size`` pixels)."""
    import numpy as np

    from kdplug.data import load_data

    dataset = load_data("sklearn:digits").dataset
    order = np.random.default_rng(seed).permutation(len(dataset))
    splits = {"train": order[:train_rows], "test": order[train_rows : train_rows + test_rows]}
    specs = {}
    for name, rows in splits.items():
        dataset.select(sorted(rows.tolist())).save_to_disk(str(root / name))
        specs[name] = f"disk:{root / name}" + (f",image_size={size}" if size != 8 else "")
    return specs


def train(out: Path, args: argparse.Namespace, **config) -> dict:
    """One ``distill`` run in this process; returns its summary."""
    from kdplug.engines.distill import DistillConfig, distill

    values = dict(
        out=str(out), batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed
    )
    values.update(config)  # may set its own seed
    return distill(DistillConfig(**values))


def timed_epochs(summary: dict) -> list[float]:
    """Seconds per epoch, the first (warm-up) left out when there are more."""
    times = summary["epoch_times_s"]
    return times[1:] if len(times) > 1 else times


def store_bytes(store: Path, rows: int, teachers: int, views: int) -> dict:
    """Bytes on disk per row per teacher per view: the teachers' entries, and everything."""
    split = store / "split-0"
    sizes = {p.stem: p.stat().st_size for p in split.glob("*.npy")}
    per_entry = rows * teachers * views
    outputs = sum(sizes[name] for name in ("values", "indices", "tail") if name in sizes)
    return {
        "teacher_outputs": outputs / per_entry,
        "all_arrays": sum(sizes.values()) / per_entry,
    }


def run(root: Path, args: argparse.Namespace) -> dict:
    from kdplug.engines.cache import CacheConfig, run_cache
    from kdplug.engines.eval import evaluate_student

    data = make_splits(root, args.size, args.train_rows, args.test_rows, args.seed)
    common = dict(train=data["train"], epochs=args.epochs)

    teachers = []
    started = time.perf_counter()
    for k, arch in enumerate(args.teacher_archs):
        out = root / f"teacher{k}"
        train(
            out,
            args,
            student=f"timm:{arch}",
            loss="ce",
            **{**common, "epochs": args.teacher_epochs, "seed": args.seed + 1 + k},
        )
        teachers.append(f"kdplug:{out}")
    teacher_seconds = time.perf_counter() - started

    started = time.perf_counter()
    store = root / "store"
    run_cache(
        CacheConfig(
            teachers,
            [data["train"]],
            str(store),
            topk=args.topk,
            views=1,
            dtype="float16",
            batch_size=256,
            device=args.device,
            progress=False,
        )
    )
    cache_seconds = time.perf_counter() - started

    kd = dict(loss=args.loss, combiner=args.combiner)
    runs = {
        "a_labels_only": dict(loss="ce"),
        "b_live_1_teacher": dict(teachers=teachers[:1], **kd),
        "c_live_3_teachers": dict(teachers=teachers, **kd),
        "d_store_3_teachers": dict(store=str(store), **kd),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    accuracy: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.repeats):
        for name, config in runs.items():
            out = root / f"{name}-{round_}"
            student = f"timm:{args.student}"
            config = {**common, **config, "seed": args.seed + round_}
            times[name] += timed_epochs(train(out, args, student=student, **config))
            test = evaluate_student(str(out / "student"), data["test"], device=args.device)
            accuracy[name].append(test["accuracy"])
    base = statistics.median(times["a_labels_only"])
    results = {
        name: {
            "epoch_time_s": statistics.median(times[name]),
            "epoch_time_ratio_to_a": statistics.median(times[name]) / base,
            "test_accuracy": statistics.mean(accuracy[name]),
            "test_accuracy_per_round": accuracy[name],
        }
        for name in runs
    }
    teacher_accuracy = [
        evaluate_student(t.split(":", 1)[1], data["test"], device=args.device)["accuracy"]
        for t in teachers
    ]
    return {
        "runs": results,
        "d_minus_c_accuracy_points": 100
        * (
            results["d_store_3_teachers"]["test_accuracy"]
            - results["c_live_3_teachers"]["test_accuracy"]
        ),
        "store_bytes_per_row_per_teacher_per_view": store_bytes(
            store, args.train_rows, len(teachers), 1
        ),
        "teacher_test_accuracy": teacher_accuracy,
        "one_off_seconds": {"train_teachers": teacher_seconds, "cache": cache_seconds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few hundred 8x8 rows (CI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--teacher-archs", nargs=3, default=["resnet10t"] * 3)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=1200)
    parser.add_argument("--test-rows", type=int, default=597)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--loss", default="kd,T=4", help="the KD loss of runs b, c and d")
    parser.add_argument("--combiner", default="mean", help="the combiner of runs b, c and d")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.tiny:
        args.teacher_archs = ["test_resnet"] * 3
        args.teacher_epochs, args.epochs, args.size, args.repeats = 1, 2, 8, 1
        args.train_rows, args.test_rows = 128, 64

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = run(Path(tmp), args)
    results["command"] = vars(args)
    results["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kdplug": kdplug.__version__,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
