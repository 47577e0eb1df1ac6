"""Seconds and peak memory of ``kdplug teachers report`` at many classes.

Synthetic, row-aligned: a saved dataset of N rows (one numeric feature, a label column of
C named classes) and K ``logits:`` teachers (.npy float32 ``[N, C]``, written in chunks with
``np.lib.format.open_memmap``, never whole in RAM), each right on a different share of the
rows. The command runs as a process (``python -m kdplug teachers report ... --out DIR``);
its wall seconds and its peak anonymous memory (RssAnon of the process and its children,
sampled every 0.1 s) are measured, and a bare numpy pass over the same teachers' files
(softmax, argmax, the true class's probability: what any report must read) gives the floor.
Inputs are made once under ``--root`` and reused. Run:

    .venv/bin/python bench/teachers_report.py --rows 100000 --classes 1000 --json tr.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHUNK = 8192


def make_inputs(root: Path, rows: int, classes: int, teachers: int) -> tuple[str, list[str]]:
    """The DATA spec and K teacher specs (made once under ``root``, then reused)."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    truth = rng.integers(0, classes, rows)
    data = root / "data"
    if not data.exists():
        import datasets

        features = datasets.Features(
            {
                "x": datasets.Value("float32"),
                "label": datasets.ClassLabel(names=[f"class-{c}" for c in range(classes)]),
            }
        )
        table = {"x": np.zeros(rows, np.float32), "label": truth}
        datasets.Dataset.from_dict(table, features=features).save_to_disk(str(data))
    specs = []
    for k in range(teachers):
        path = root / f"teacher{k}.npy"
        if not path.exists():
            write_teacher(path, truth, classes, accuracy=0.5 + 0.15 * k, seed=k)
        specs.append(f"logits:{path}")
    return f"disk:{data}", specs


def write_teacher(path: Path, truth, classes: int, accuracy: float, seed: int) -> None:
    """Logits ``[N, C]`` right on about ``accuracy`` of the rows, chunk by chunk."""
    import numpy as np

    rng = np.random.default_rng(100 + seed)
    out = np.lib.format.open_memmap(path, "w+", np.float32, (len(truth), classes))
    for start in range(0, len(truth), CHUNK):
        y = truth[start : start + CHUNK]
        vote = np.where(rng.random(len(y)) < accuracy, y, rng.integers(0, classes, len(y)))
        z = rng.normal(size=(len(y), classes)).astype(np.float32)
        z[np.arange(len(y)), vote] += rng.uniform(1.0, 8.0, len(y)).astype(np.float32)
        out[start : start + len(y)] = z
    out.flush()
    del out


def rss_anon(pid: int) -> int:
    """Anonymous resident bytes of ``pid`` and its descendants (0 for one that ended)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                total += int(line.split()[1]) * 1024
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(rss_anon(int(child)) for child in children)


def run_measured(command: list[str], env: dict | None = None) -> dict:
    """Run ``command``; its wall seconds, user CPU seconds and peak anonymous memory."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, rss_anon(process.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = process.communicate()
    thread.join()
    seconds = time.perf_counter() - started
    import resource

    user = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{err.decode()[-2000:]}")
    return {"seconds": seconds, "user_cpu_s": user, "peak_anon_bytes": peak}


def bare_pass(specs: list[str], data: str) -> float:
    """Seconds of one numpy pass over the teachers' files: softmax, argmax and the true
    class's probability of every row, CHUNK rows at a time."""
    import numpy as np

    from kdplug.data import load_data

    truth = load_data(data).labels()
    arrays = [np.load(spec.removeprefix("logits:"), mmap_mode="r") for spec in specs]
    started = time.perf_counter()
    for start in range(0, len(truth), CHUNK):
        y = truth[start : start + CHUNK]
        for z in arrays:
            z = np.asarray(z[start : start + CHUNK], dtype=np.float32)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p.argmax(1), p[np.arange(len(y)), y]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--root", default="/work/bench_data/teachers_report")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--block-combiners",
        action="store_true",
        help="run with KDPLUG_BLOCK_PLUGINS=combiners: no ensemble table and no selection, "
        "whose 20 fits of auto take about a minute and a half at 1,000 classes",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    root = Path(args.root) / f"n{args.rows}-c{args.classes}-k{args.teachers}"
    data, specs = make_inputs(root, args.rows, args.classes, args.teachers)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "kdplug", "teachers", "report", "--data", data]
        for spec in specs:
            command += ["--teacher", spec]
        command += ["--out", f"{tmp}/report", "--batch-size", str(args.batch_size)]
        env = {**os.environ, "KDPLUG_BLOCK_PLUGINS": "combiners"} if args.block_combiners else None
        engine = run_measured(command, env)
    bare = bare_pass(specs, data)
    results = {
        "rows": args.rows,
        "classes": args.classes,
        "teachers": args.teachers,
        "batch_size": args.batch_size,
        "block_combiners": args.block_combiners,
        "report": engine,
        "bare_pass_s": bare,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_1min": os.getloadavg()[0],
        },
        "command": " ".join(command),
    }
    print("| N | C | K | report s | peak anon MB | bare numpy pass s | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.rows:,} | {args.classes:,} | {args.teachers} | {engine['seconds']:.1f} | "
        f"{engine['peak_anon_bytes'] / 2**20:,.0f} | {bare:.1f} | {os.getloadavg()[0]:.1f} |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
