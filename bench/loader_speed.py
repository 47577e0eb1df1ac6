"""distill's image loader against a plain DataLoader with timm's transform: images/s.

The data: a folder of real photographs in class subfolders (``--images`` files, made once
from scikit-learn's two sample photos: random crops at random sizes of 256-500 px per side,
two in three saved as JPEG (quality 90), one in three as PNG), read as distill reads it
(``imagefolder:DIR,image_size=S``).

- kdplug: the loader ``distill`` trains from (``kdplug.engines.distill.train_loader``: decode,
  ``--augment``'s per-image transform in the workers, collate, persistent workers), with
  ``--augment`` on (timm's training transform) and off (the images resized to S).
- plain: ``torchvision.datasets.ImageFolder`` over the same files with
  ``timm.data.create_transform(S, is_training=True)`` (augment on) or ``is_training=False``
  (off), in a ``torch.utils.data.DataLoader`` of the same batch size and workers (persistent
  too, so both are timed warm).

No student step: each batch is taken and dropped. Each loader runs ``--epochs`` epochs over
all files; the first (worker start, page cache) is left out and the rest timed. kdplug and
plain alternate ``--repeats`` times and each figure is the median, so a shared machine's
load drifts over both alike. Also given: images per CPU second of the loading process tree
(the main process and its workers, from /proc), which a busy machine disturbs less than
wall time. Target: kdplug >= 0.9x plain's images/s. Run:

    .venv/bin/python bench/loader_speed.py --json loader_speed.json
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

import numpy as np

import kdplug

CLASSES = 10
SOURCES: dict = {}


def make_images(root: Path, count: int, seed: int) -> Path:
    """``count`` JPEG and PNG files in ``CLASSES`` class folders under ``root`` (made once:
    a marker file holds the count made)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    marker = root / "made.json"
    if marker.exists() and json.loads(marker.read_text()) == {"count": count, "seed": seed}:
        return root
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = photo.size
        scale = rng.uniform(0.3, 1.0)
        w, h = int(width * scale), int(height * scale)
        x0, y0 = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
        size = tuple(int(v) for v in rng.integers(256, 501, 2))
        image = photo.crop((x0, y0, x0 + w, y0 + h)).resize(size, Image.BILINEAR)
        if rng.uniform() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        if i % 3 == 2:
            image.save(folder / f"{i:05d}.png")
        else:
            image.save(folder / f"{i:05d}.jpg", quality=90)
    marker.write_text(json.dumps({"count": count, "seed": seed}))
    return root


def kdplug_loader(root: Path, args: argparse.Namespace, augment: bool, workers: int):
    """The loader distill builds for ``--train imagefolder:ROOT,image_size=S``."""
    from kdplug.data import load_data
    from kdplug.engines.distill import DistillConfig, TrainRows, train_loader

    config = DistillConfig(
        student="timm:resnet18",
        train=f"imagefolder:{root},image_size={args.size}",
        out=str(Path(tempfile.gettempdir()) / "unused"),
        loss="ce",
        batch_size=args.batch_size,
        workers=workers,
        augment="default" if augment else None,
        seed=args.seed,
    )
    if config.train not in SOURCES:  # datasets' imagefolder takes a while to index the files
        SOURCES[config.train] = load_data(config.train)
    return train_loader(TrainRows(SOURCES[config.train], None), config, pin=False)


def plain_loader(root: Path, args: argparse.Namespace, augment: bool, workers: int):
    """A DataLoader over ``ImageFolder(root)`` with timm's transform, as a timm script has."""
    import torch
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    transform = create_transform(args.size, is_training=augment)
    return torch.utils.data.DataLoader(
        ImageFolder(str(root), transform=transform),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the workers), read
    from /proc: what the loading costs, less disturbed than wall time by a shared machine."""
    tick, me, total = os.sysconf("SC_CLK_TCK"), os.getpid(), 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(entry) == me or int(fields[1]) == me:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure(loader, epochs: int) -> tuple[float, float]:
    """Images per wall second and per CPU second (``tree_cpu_seconds``) over the epochs after
    the first; each batch is taken and dropped."""
    images, seconds, cpu = 0, 0.0, 0.0
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        start, cpu_start, seen = time.perf_counter(), tree_cpu_seconds(), 0
        for x, *_ in loader:
            seen += len(x)
        if epoch or epochs == 1:
            images += seen
            seconds += time.perf_counter() - start
            cpu += tree_cpu_seconds() - cpu_start
    return images / seconds, images / cpu


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict:
    import PIL
    import timm
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "kdplug": kdplug.__version__,
    }


def run(args: argparse.Namespace) -> dict:
    root = make_images(Path(args.data), args.images, args.seed)
    results: list[dict] = []
    report = {"args": vars(args), "machine": machine(), "results": results}
    for workers in args.workers:
        for augment in (True, False):
            figures: dict[str, list] = {"kdplug": [], "plain": []}
            for _ in range(args.repeats):
                for name, build in (("kdplug", kdplug_loader), ("plain", plain_loader)):
                    loader = build(root, args, augment, workers)
                    figures[name].append(measure(loader, args.epochs))
                    del loader
            row: dict = {"workers": workers, "augment": augment}
            for name, runs in figures.items():
                row[f"{name}_images_per_s"] = statistics.median(r[0] for r in runs)
                row[f"{name}_images_per_cpu_s"] = statistics.median(r[1] for r in runs)
            row["ratio"] = row["kdplug_images_per_s"] / row["plain_images_per_s"]
            row["cpu_ratio"] = row["kdplug_images_per_cpu_s"] / row["plain_images_per_cpu_s"]
            row.update(runs=figures, load=load_average())
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
            if args.json:  # as it goes: a long run stopped early keeps its rows
                Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def table(report: dict) -> str:
    lines = [
        "| workers | --augment | kdplug images/s | plain images/s | ratio (target >= 0.9) "
        "| kdplug images/CPU s | plain images/CPU s | CPU ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        passed = "pass" if r["ratio"] >= 0.9 else "FAIL"
        lines.append(
            f"| {r['workers']} | {'on' if r['augment'] else 'off'} | "
            f"{r['kdplug_images_per_s']:.0f} | {r['plain_images_per_s']:.0f} | "
            f"{r['ratio']:.2f} {passed} | {r['kdplug_images_per_cpu_s']:.0f} | "
            f"{r['plain_images_per_cpu_s']:.0f} | {r['cpu_ratio']:.2f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/bench_data/images", help="the image folder")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224, help="image_size= / timm input size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2, help="the first is not timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    report = run(args)
    report["seconds"] = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"total {report['seconds']:.0f} s, load average at the end {load_average()}")


if __name__ == "__main__":
    main()
