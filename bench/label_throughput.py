"""Rows/s of the label engine against a bare PyTorch loop running the same teachers.

The engine is timed end to end (``kdplug.engines.label.run_label``: decoding the images, the
teachers, the mean combiner, shard writes, the generator and the output dataset). The
bare loop runs the same teacher modules over the same images, already decoded into one
tensor, batch by batch under ``torch.inference_mode()`` (and the same AMP on CUDA) and
keeps each teacher's softmax. Teachers are timm models with random weights loaded through
the ``timm:ARCH,checkpoint=...`` teacher source. Run:

    .venv/bin/python bench/label_throughput.py --rows 4096 --model resnet10t --size 32
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def make_data(root: Path, rows: int, size: int, classes: int) -> str:
    """A saved dataset of random RGB PNG images (``size`` x ``size``) with labels."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[f"c{i}" for i in range(classes)]),
        }
    )
    table = {
        "image": [Image.fromarray(p) for p in pixels],
        "label": rng.integers(0, classes, rows).tolist(),
    }
    path = root / "data"
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(path))
    return f"disk:{path}"


def make_teachers(root: Path, model: str, count: int, classes: int, size: int) -> list[str]:
    """``count`` timm checkpoints with different random weights, as teacher specs that
    run at ``size`` x ``size`` (no resize to the architecture's default input)."""
    import timm
    import torch
    from safetensors.torch import save_file

    specs = []
    for k in range(count):
        torch.manual_seed(k)
        net = timm.create_model(model, num_classes=classes)
        path = root / f"teacher{k}.safetensors"
        save_file(net.state_dict(), str(path))
        specs.append(f"timm:{model},checkpoint={path},num_classes={classes},size={size}")
    return specs


def engine_rate(specs: list[str], data: str, out: Path, batch_size: int, device: str) -> float:
    from kdplug.engines.label import LabelConfig, run_label

    config = LabelConfig(
        teachers=specs,
        data=data,
        out=str(out),
        generator="threshold",
        batch_size=batch_size,
        device=device,
        overwrite=True,
        progress=False,
    )
    started = time.perf_counter()
    report = run_label(config)
    return report["rows"] / (time.perf_counter() - started)


def bare_rate(specs: list[str], data: str, batch_size: int, device: str) -> float:
    import torch

    from kdplug.data import load_data
    from kdplug.device import pick_device
    from kdplug.engines.label import autocast
    from kdplug.plugins import create

    source = load_data(data)
    x_all, _, _ = source.batch(list(range(len(source))))
    target = pick_device(device)
    teachers = [create("teachers", s).to(target).eval() for s in specs]
    if target.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    kept = []
    with torch.inference_mode():
        for i in range(0, len(x_all), batch_size):
            x = x_all[i : i + batch_size].to(target, non_blocking=True)
            with autocast(target):
                logits = [t(x) for t in teachers]
            kept.append(torch.stack([z.float().softmax(-1) for z in logits]).cpu())
    return len(x_all) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--model", default="resnet10t", help="timm architecture of the teachers")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()

    import torch

    from kdplug.device import pick_device

    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device {device} ({name or platform.machine()}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.rows} rows of {args.size}x{args.size} RGB PNG, teachers timm {args.model}, "
        f"batch {args.batch_size}, best of {args.repeats}"
    )
    print("| teachers | engine rows/s | bare loop rows/s | engine / bare |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root, args.rows, args.size, 10)
        specs = make_teachers(root, args.model, 3, 10, args.size)
        for count in (1, 3):
            chosen = specs[:count]
            engine = max(
                engine_rate(chosen, data, root / "out", args.batch_size, args.device)
                for _ in range(args.repeats)
            )
            bare = max(
                bare_rate(chosen, data, args.batch_size, args.device) for _ in range(args.repeats)
            )
            print(f"| {count} | {engine:,.0f} | {bare:,.0f} | {engine / bare:.2f} |")


if __name__ == "__main__":
    main()
