"""``kdplug cache`` and ``distill --store`` at scale: wall time and peak anonymous memory.

Synthetic row-aligned teachers (``logits:`` .npy files, float32 ``[N, C]``, ``K`` of them)
and a DATA of ``N`` rows (a saved dataset of 8x8 grayscale PNGs with ``C`` labelled
classes) are made once per ``N`` under ``--data-dir`` (memory-mapped, written in chunks) and
reused. For each ``N``:

- ``kdplug cache --topk K`` as a user runs it (a subprocess), against a bare streaming loop
  (numpy, in its own subprocess: read the logits in chunks, log-softmax, top-k, the log of
  the mass outside the top-k, written to memory-mapped ``.npy`` files of the store's
  layout, in the store's dtypes; the view arrays too);
- one epoch of ``kdplug distill --store`` with a small timm student over that store.

Memory is the peak over samples every 0.1 s of the anonymous memory (``RssAnon`` in
``/proc/PID/status``) summed over the process and its children; the page cache of the
memory-mapped inputs and outputs does not count. Run:

    .venv/bin/python bench/cache_scale.py --sizes 100000 400000 1280000 --json cache_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

IMPOSSIBLE_X2 = -2e4  # 2 * kdplug.ops.IMPOSSIBLE: the floor kdplug cache clamps to
CHUNK = 8192  # rows per chunk when making inputs and in the bare loop


def measure(command: list[str], log: Path, threads: int) -> dict:
    """Run ``command`` with ``threads`` OpenMP threads; its wall time, CPU time (user + sys)
    and peak tree RssAnon (sampled every 0.1 s)."""
    from kdplug.testing import anonymous_kib

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    peak, done = [0], threading.Event()
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], anonymous_kib(proc.pid))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)  # usage: it and the children it waited for
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"{' '.join(command)} failed ({code}); see {log}:\n{log.read_text()[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_anon_mb": peak[0] / 1024}


def make_inputs(root: Path, rows: int, classes: int, teachers: int) -> tuple[str, list[Path]]:
    """The DATA spec and the teachers' .npy files of ``rows`` rows, made once under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    files = [root / f"teacher{k}.npy" for k in range(teachers)]
    data = root / "data"
    if not (root / "READY").exists():
        labels = np.random.default_rng(rows).integers(0, classes, rows)
        make_data(data, labels, classes)
        for k, file in enumerate(files):
            make_logits(file, labels, classes, seed=k)
        (root / "READY").write_text("ok\n")
    return f"disk:{data}", files


def make_data(path: Path, labels: np.ndarray, classes: int) -> None:
    """A saved dataset of random 8x8 grayscale PNGs with ``labels`` (made chunk by chunk)."""
    import io

    import datasets
    from PIL import Image

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[f"c{i:04d}" for i in range(classes)]),
        }
    )
    rng = np.random.default_rng(0)
    parts = []
    for start in range(0, len(labels), 100_000):
        stop = min(start + 100_000, len(labels))
        pngs = []
        for pixels in rng.integers(0, 256, (stop - start, 8, 8), dtype=np.uint8):
            buffer = io.BytesIO()
            Image.fromarray(pixels, "L").save(buffer, format="PNG")
            pngs.append({"bytes": buffer.getvalue(), "path": None})
        table = {"image": pngs, "label": labels[start:stop].tolist()}
        parts.append(datasets.Dataset.from_dict(table, features=features))
    datasets.concatenate_datasets(parts).save_to_disk(str(path))


def make_logits(path: Path, labels: np.ndarray, classes: int, seed: int) -> None:
    """``[N, classes]`` float32 logits, noisy but peaked at each row's label, written to a
    memory-mapped .npy file ``CHUNK`` rows at a time."""
    rng = np.random.default_rng(1000 + seed)
    array = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float32, shape=(len(labels), classes)
    )
    for start in range(0, len(labels), CHUNK):
        stop = min(start + CHUNK, len(labels))
        chunk = rng.standard_normal((stop - start, classes), dtype=np.float32) * 2
        chunk[np.arange(stop - start), labels[start:stop]] += 6
        array[start:stop] = chunk
    array.flush()
    del array


def bare_loop(files: list[Path], out: Path, topk: int) -> None:
    """What the store holds per row (view 0 only), computed with numpy chunk by chunk:
    float16 top-k log-probabilities, int16 classes, float16 log of the rest; view arrays."""
    inputs = [np.load(f, mmap_mode="r") for f in files]
    rows, T = len(inputs[0]), len(inputs)
    out.mkdir(parents=True, exist_ok=True)

    def new(name: str, shape: tuple, dtype) -> np.ndarray:
        return np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    values = new("values", (rows, 1, T, topk), np.float16)
    indices = new("indices", (rows, 1, T, topk), np.int16)
    tail = new("tail", (rows, 1, T), np.float16)
    arrays = [values, indices, tail, new("boxes", (rows, 1, 4), np.float32)]
    arrays += [new(name, (rows, 1), dtype) for name, dtype in (("flips", bool), ("bad", bool))]
    arrays += [new("seeds", (rows, 1), np.int64)]
    arrays[3][:] = (0, 0, 1, 1)
    for start in range(0, rows, CHUNK):
        stop = min(start + CHUNK, rows)
        z = np.stack([np.asarray(a[start:stop]) for a in inputs], 1)  # [R, T, C]
        z -= z.max(-1, keepdims=True)
        total = np.exp(z).sum(-1)  # [R, T]
        top = np.argpartition(z, -topk, axis=-1)[..., -topk:]
        top_z = np.take_along_axis(z, top, -1)
        order = np.argsort(-top_z, axis=-1)
        top, top_z = np.take_along_axis(top, order, -1), np.take_along_axis(top_z, order, -1)
        log_total = np.log(total)
        rest = np.maximum(total - np.exp(top_z).sum(-1), 1e-30)
        values[start:stop, 0] = np.maximum(top_z - log_total[..., None], IMPOSSIBLE_X2)
        indices[start:stop, 0] = top
        tail[start:stop, 0] = np.maximum(np.log(rest) - log_total, IMPOSSIBLE_X2)
    for array in arrays:
        array.flush()


def kdplug_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "kdplug"), *args]


def run_size(rows: int, args: argparse.Namespace, work: Path) -> dict:
    """Bare loop, kdplug cache and one distill epoch at ``rows`` rows."""
    data, files = make_inputs(args.data_dir / f"n{rows}", rows, args.classes, args.teachers)
    result: dict = {"rows": rows}
    bare_out, store = work / f"bare-{rows}", work / f"store-{rows}"
    for path in (bare_out, store):
        shutil.rmtree(path, ignore_errors=True)
    result["bare"] = measure(
        [sys.executable, __file__, "bare", "--out", str(bare_out), "--topk", str(args.topk)]
        + [str(f) for f in files],
        work / f"bare-{rows}.log",
        args.threads,
    )
    teachers = [arg for f in files for arg in ("--teacher", f"logits:{f}")]
    result["cache"] = measure(
        kdplug_command(
            "cache", *teachers, "--data", data, "--out", str(store), "--topk", str(args.topk)
        )
        + args.cache_args,
        work / f"cache-{rows}.log",
        args.threads,
    )
    for clock in ("wall_s", "cpu_s"):
        ratio = result["bare"][clock] / result["cache"][clock]
        result["cache"][f"throughput_vs_bare_{clock[:-2]}"] = ratio
    result["same_arrays"] = same_arrays(store / "split-0", bare_out)
    shutil.rmtree(bare_out, ignore_errors=True)
    if args.distill_max_rows is None or rows <= args.distill_max_rows:
        run = work / f"distill-{rows}"
        result["distill"] = measure(
            kdplug_command(
                "distill",
                "--store",
                str(store),
                "--student",
                args.student,
                "--train",
                data,
                "--out",
                str(run),
                "--epochs",
                "1",
                "--batch-size",
                str(args.batch_size),
                "--device",
                "cpu",
                "--combiner",
                args.combiner,
                "--overwrite",
            ),
            work / f"distill-{rows}.log",
            args.threads,
        )
        summary = json.loads((run / "summary.json").read_text())
        result["distill"]["epoch_s"] = summary["epoch_times_s"][0]
        shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    return result


def same_arrays(store: Path, bare: Path) -> dict:
    """How the store's arrays compare with the bare loop's: classes equal where the values
    are not tied, largest difference of the float16 log-probabilities."""
    out = {}
    values = np.load(store / "values.npy", mmap_mode="r")
    bare_values = np.load(bare / "values.npy", mmap_mode="r")
    diffs, agree, total = [], 0, 0
    for start in range(0, len(values), 65536):
        a = np.asarray(values[start : start + 65536], np.float32)
        b = np.asarray(bare_values[start : start + 65536], np.float32)
        diffs.append(float(np.abs(a - b).max()))
        i = np.load(store / "indices.npy", mmap_mode="r")[start : start + 65536]
        j = np.load(bare / "indices.npy", mmap_mode="r")[start : start + 65536]
        agree, total = agree + int((i == j).sum()), total + i.size
    out["values_max_abs_diff"] = max(diffs)
    out["indices_agree"] = agree / total
    tails = [np.load(p / "tail.npy", mmap_mode="r") for p in (store, bare)]
    out["tail_max_abs_diff"] = float(
        max(
            np.abs(
                np.asarray(tails[0][s : s + 65536], np.float32)
                - np.asarray(tails[1][s : s + 65536], np.float32)
            ).max()
            for s in range(0, len(tails[0]), 65536)
        )
    )
    return out


def table(results: list[dict]) -> str:
    """The markdown table of docs/benchmarks.md."""
    lines = [
        "| rows | bare loop: wall s / CPU s / peak anon MB "
        "| `kdplug cache`: wall s / CPU s / peak anon MB "
        "| cache throughput vs bare (wall / CPU) "
        "| `distill --store`, 1 epoch: wall s / epoch s / peak anon MB | load avg |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        bare, cache, distill = r["bare"], r["cache"], r.get("distill")
        d = "not run"
        if distill:
            d = f"{distill['wall_s']:.0f} / {distill['epoch_s']:.0f} / "
            d += f"{distill['peak_anon_mb']:.0f}"
        lines.append(
            f"| {r['rows']:,} "
            f"| {bare['wall_s']:.1f} / {bare['cpu_s']:.1f} / {bare['peak_anon_mb']:.0f} "
            f"| {cache['wall_s']:.1f} / {cache['cpu_s']:.1f} / {cache['peak_anon_mb']:.0f} "
            f"| {cache['throughput_vs_bare_wall']:.2f}x / {cache['throughput_vs_bare_cpu']:.2f}x "
            f"| {d} | {r['load_avg_before'][0]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "bare":
        parser = argparse.ArgumentParser()
        parser.add_argument("bare")
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--topk", type=int, default=5)
        parser.add_argument("files", type=Path, nargs="+")
        args = parser.parse_args()
        bare_loop(args.files, args.out, args.topk)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_280_000])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench_data/cache_scale"))
    parser.add_argument("--work", type=Path, default=None, help="stores (default: in data-dir)")
    parser.add_argument("--student", default="timm:test_resnet")
    parser.add_argument("--batch-size", type=int, default=256, help="distill's batch size")
    parser.add_argument("--combiner", default="mean", help="distill's combiner")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--cache-args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument(
        "--distill-max-rows", type=int, help="run distill only at sizes up to this many rows"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    work = args.work or args.data_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.sizes:
        load = os.getloadavg()
        results.append({**run_size(rows, args, work), "load_avg_before": load})
        results[-1]["load_avg_after"] = os.getloadavg()
        print(json.dumps(results[-1]), flush=True)
    summary = {
        "results": results,
        "command": " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        },
    }
    if len(results) > 1:
        first, last = results[0], results[-1]
        summary["cache_memory_growth"] = (
            last["cache"]["peak_anon_mb"] / first["cache"]["peak_anon_mb"]
        )
        if "distill" in first:
            summary["distill_memory_growth"] = (
                last["distill"]["peak_anon_mb"] / first["distill"]["peak_anon_mb"]
            )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
