"""Scaling of `kdplug label` (rows/s) and `kdplug distill` (samples/s) over processes.

Each run is a real `python -m kdplug ... --nproc-per-node N` (torch's elastic launcher,
gloo on CPU, nccl on CUDA), one thread per process (OMP_NUM_THREADS=1). The rates are the
engines' own, so the launcher's and the processes' start-up are left out:

- label: DATA's rows / ``report.json``'s ``seconds`` (rank 0, from loading the data to the
  written dataset: teachers over all shards by every rank, the merge, the generator);
- distill: ``summary.json``'s ``samples_per_s`` (rows trained on by all ranks per second
  of the training loop, mean over the epochs; validation excluded).

Efficiency at N processes is rate(N) / (N * rate(1)). Data: scikit-learn digits (1797 rows,
8x8 grayscale) upsampled to ``--size``; the teacher a random CNN (TorchScript), the student
timm's test_resnet. Run:

    .venv/bin/python bench/scaling.py --procs 1,2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = "sklearn:digits"
ROWS = 1797


def make_teacher(root: Path, width: int) -> Path:
    """A random two-layer CNN saved as TorchScript."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(width, 10),
    ).eval()
    path = root / "teacher.pt"
    torch.jit.save(torch.jit.script(net), path)
    return path


def kdplug(args: list[str], procs: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "kdplug", *args, "--nproc-per-node", str(procs)]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, timeout=3600)


def label_rate(root: Path, teacher: str, procs: int, device: str, batch: int) -> float:
    out = root / f"label-{procs}"
    kdplug(
        [
            *["label", "--teacher", teacher, "--data", DATA, "--out", str(out)],
            *["--device", device, "--batch-size", str(batch), "--shard-size", "128"],
            "--overwrite",
        ],
        procs,
    )
    report = json.loads((out / "report.json").read_text())
    return report["rows"] / report["seconds"]


def distill_rate(
    root: Path, teacher: str, procs: int, device: str, batch: int, epochs: int
) -> float:
    out = root / f"distill-{procs}"
    kdplug(
        [
            *["distill", "--student", "timm:test_resnet", "--teacher", teacher],
            *["--combiner", "mean", "--train", DATA, "--out", str(out)],
            *["--epochs", str(epochs), "--batch-size", str(batch), "--device", device],
            "--overwrite",
        ],
        procs,
    )
    return json.loads((out / "summary.json").read_text())["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", default="1,2", help="process counts, e.g. 1,2,4")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", type=int, default=32, help="teacher input size")
    parser.add_argument("--width", type=int, default=32, help="teacher CNN channels")
    parser.add_argument("--label-batch", type=int, default=64)
    parser.add_argument("--distill-batch", type=int, default=32, help="rows per rank and step")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = f"torchscript:{make_teacher(root, args.width)},size={args.size},allow_code=true"
        rates = {"label rows/s": {}, "distill samples/s": {}}
        for n in procs:
            rates["label rows/s"][n] = label_rate(root, teacher, n, args.device, args.label_batch)
            rates["distill samples/s"][n] = distill_rate(
                root, teacher, n, args.device, args.distill_batch, args.epochs
            )

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, device {args.device}")
    print(f"load average before the last run: {os.getloadavg()[0]:.1f}")
    print("| engine | processes | rate | efficiency |")
    print("|---|---|---|---|")
    for name, by_procs in rates.items():
        base = by_procs[procs[0]] / procs[0]
        for n, rate in by_procs.items():
            print(f"| {name} | {n} | {rate:.0f} | {rate / (n * base):.2f} |")


if __name__ == "__main__":
    main()
