"""`kdplug label` at scale against a bare streaming loop: wall time and peak anonymous memory.

Synthetic row-aligned teachers: K `logits:` .npy files (float32, [N, C]) over N rows of a
C-class problem, and DATA a saved dataset of N rows with one float column (the teachers
read their rows by position; DATA only sets N). kdplug runs as a process, as a user runs it
(`kdplug label --teacher logits:... --combiner mean --generator G`); the bare loop reads
the same files 8,192 rows at a time (numpy: softmax, mean over teachers, max, threshold)
and writes what kdplug writes by default at C > 100 (index, label, accepted, confidence and
the top 10 classes with their probabilities) with pyarrow, 8,192 rows at a time.

Both run with ``--threads`` compute threads (OMP_NUM_THREADS, default 1: the bare loop's
numpy is single-threaded, and on a machine shared with other work torch's spinning threads
slow it several-fold). Memory is the anonymous memory (RssAnon in /proc/PID/status) of the
process and its children, sampled every 0.05 s: the page cache of the memory-mapped
inputs, which the kernel keeps resident at will, does not count.

    .venv/bin/python bench/label_scale.py --rows 100000 400000 1280000 --json label_scale.json
    .venv/bin/python bench/label_scale.py --rows 400000 --generators all --skip-bare
    .venv/bin/python bench/label_scale.py --rows 1280000 --inputs DIR --cache warm --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from kdplug.testing import run_measured, set_page_cache

ROOT = Path(__file__).resolve().parents[1]
GENERATORS = [
    "threshold",
    "threshold,floor=0.25",
    "soft",
    "topk",
    "class-balanced",
    "adaptive",
    "agreement",
    "dawid-skene,soft=false",
    "dawid-skene,max_iter=2",  # soft evidence at 1,000 classes: minutes per EM iteration
    "pate",
]
CHUNK = 8192
TOPK = 10


def make_inputs(folder: Path, rows: int, classes: int, teachers: int) -> tuple[list[Path], Path]:
    """The teachers' .npy files and DATA, made once in ``folder`` (chunk by chunk)."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"teacher{k}.npy" for k in range(teachers)]
    rng = np.random.default_rng(0)
    truth = rng.integers(0, classes, rows)
    for k, path in enumerate(files):
        if path.exists():
            continue
        partial = path.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(partial, "w+", np.float32, (rows, classes))
        teacher_rng = np.random.default_rng(k + 1)
        for start in range(0, rows, 65536):
            stop = min(start + 65536, rows)
            block = teacher_rng.standard_normal((stop - start, classes), dtype=np.float32)
            block[np.arange(stop - start), truth[start:stop]] += 3.0 + k  # unequal teachers
            out[start:stop] = block
        out.flush()
        del out
        os.replace(partial, path)
    data = folder / "data"
    if not data.exists():
        dataset = datasets.Dataset.from_dict({"x": np.zeros(rows, dtype=np.float32)})
        dataset.save_to_disk(str(folder / "data.partial"))
        os.replace(folder / "data.partial", data)
    return files, data


def measured(command: list[str]) -> tuple[float, float]:
    """Run ``command``; its wall seconds and peak anonymous memory (GB) of its tree."""
    seconds, peak, done = run_measured(command)
    if done.returncode:
        raise SystemExit(f"{command[:4]} failed: {done.stderr[-2000:]}")
    return seconds, peak


def kdplug_command(
    files: list[Path], data: Path, out: Path, generator: str, classes: int | None
) -> list[str]:
    teachers = [arg for path in files for arg in ("--teacher", f"logits:{path}")]
    names = [] if classes is None else ["--classes", ",".join(f"c{i}" for i in range(classes))]
    return [
        str(ROOT / ".venv/bin/kdplug"),
        "label",
        *teachers,
        "--data",
        f"disk:{data}",
        "--out",
        str(out),
        "--overwrite",
        *names,
        "--combiner",
        "mean",
        "--generator",
        generator,
        "--batch-size",
        "1024",
        "--device",
        "cpu",
    ]


def bare_loop(files: list[str], out: str, tau: float = 0.95) -> None:
    """The bare streaming loop (run in a child process by ``main``)."""
    import pyarrow as pa

    arrays = [np.load(f, mmap_mode="r") for f in files]
    rows = len(arrays[0])
    schema = pa.schema(
        [
            ("index", pa.int64()),
            ("label", pa.int64()),
            ("accepted", pa.bool_()),
            ("confidence", pa.float32()),
            ("topk_indices", pa.list_(pa.int64(), TOPK)),
            ("topk_values", pa.list_(pa.float32(), TOPK)),
        ]
    )
    with pa.OSFile(out, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, rows, CHUNK):
            stop = min(start + CHUNK, rows)
            mean = 0.0
            for array in arrays:
                logits = np.asarray(array[start:stop], dtype=np.float32)
                logits = logits - logits.max(1, keepdims=True)
                p = np.exp(logits)
                mean = mean + p / p.sum(1, keepdims=True)
            mean /= len(arrays)
            confidence, label = mean.max(1), mean.argmax(1)
            accepted = confidence >= tau
            top = np.argpartition(-mean, TOPK, axis=1)[:, :TOPK]
            values = np.take_along_axis(mean, top, 1)
            order = np.argsort(-values, axis=1)
            top, values = np.take_along_axis(top, order, 1), np.take_along_axis(values, order, 1)
            batch = pa.record_batch(
                [
                    pa.array(np.arange(start, stop)),
                    pa.array(np.where(accepted, label, -1)),
                    pa.array(accepted),
                    pa.array(confidence),
                    pa.FixedSizeListArray.from_arrays(top.reshape(-1).astype(np.int64), TOPK),
                    pa.FixedSizeListArray.from_arrays(values.reshape(-1), TOPK),
                ],
                schema=schema,
            )
            writer.write_batch(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--generators", nargs="+", default=["threshold"], help="or: all")
    parser.add_argument("--data-dir", default="/work/bench_data/label_scale")
    parser.add_argument(
        "--inputs",
        default=None,
        help="a folder already holding teacher0.npy... and data/ (with its own classes), "
        "used instead of making them (one size only)",
    )
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument("--keep-inputs", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    parser.add_argument(
        "--cache",
        choices=["warm", "cold"],
        default=None,
        help="before each run, read the teacher files into the page cache (warm) or drop the "
        "page cache (cold, root only); default: as the previous run left it",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--bare", nargs=2, metavar=("FILES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_loop(args.bare[0].split(","), args.bare[1])
        return
    generators = GENERATORS if args.generators == ["all"] else args.generators
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for both runs: they are children
    results = []
    for rows in args.rows:
        if args.inputs:
            folder = Path(args.inputs)
            files = [folder / f"teacher{k}.npy" for k in range(args.teachers)]
            data, names = folder / "data", None  # the data's own class names
        else:
            folder = Path(args.data_dir) / f"{rows}x{args.classes}x{args.teachers}"
            files, data = make_inputs(folder, rows, args.classes, args.teachers)
            names = args.classes
        out = Path(args.data_dir) / "out"
        for _repeat in range(args.repeats):  # bare and kdplug alternate
            if not args.skip_bare:
                if args.cache:
                    set_page_cache(args.cache, files)
                command = [sys.executable, __file__, "--bare", ",".join(map(str, files)), str(out)]
                seconds, peak = measured(command)
                results.append(
                    {"rows": rows, "run": "bare loop", "seconds": seconds, "peak_gb": peak}
                )
                print(json.dumps(results[-1]), flush=True)
                out.unlink()
            for generator in generators:
                if args.cache:
                    set_page_cache(args.cache, files)
                seconds, peak = measured(kdplug_command(files, data, out, generator, names))
                report = json.loads((out / "report.json").read_text())
                results.append(
                    {
                        "rows": rows,
                        "run": f"kdplug label --generator {generator}",
                        "seconds": seconds,
                        "peak_gb": peak,
                        "accepted": report["accepted"],
                        "probs": report["probs"]["written"],
                        # an EM's iterations (dawid-skene), where the generator says them
                        "iterations": report["generator"]["info"].get("iterations"),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
                shutil.rmtree(out)
        if not args.keep_inputs and not args.inputs:
            shutil.rmtree(folder)
    print("\n| rows | run | wall s (median) | each | peak anonymous memory GB (max) |")
    print("| --- | --- | --- | --- | --- |")
    for key in dict.fromkeys((r["rows"], r["run"]) for r in results):
        runs = [r for r in results if (r["rows"], r["run"]) == key]
        each = " / ".join(f"{r['seconds']:.1f}" for r in runs)
        wall = float(np.median([r["seconds"] for r in runs]))
        peak = max(r["peak_gb"] for r in runs)
        print(f"| {key[0]:,} | {key[1]} | {wall:.1f} | {each} | {peak:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
