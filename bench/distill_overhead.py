"""The distill engine's overhead against a minimal hand-written PyTorch KD loop.

Same data (scikit-learn digits at ``--size`` pixels, all rows labeled), same batches
(``kdplug.data.batches``: same shuffle, same drop_last), same teacher (a kdplug student
directory, run as the engine runs it), same student architecture, same KD loss
(``0.1 * CE + 0.9 * T^2 * KL``, T = 4) and optimizer (AdamW). Each is timed per epoch:
the hand loop around its batches, the engine from one ``on_epoch_end`` hook call to the
next (so checkpoints, metrics lines and hooks are inside its time). The first epoch of
every run is left out (warm-up). ``--repeats`` times, the two run back to back (which
goes first alternates); ``ratio`` is the median over those pairs of engine / hand epoch
time, so the slow drift of a shared machine's load cancels. ``step_ratio`` times the
training step alone, engine and hand loop taking turns batch by batch. Run on CPU:

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_overhead.py

(a short check: ``--size 16 --epochs 2 --repeats 1``). The hand loop runs as the engine
runs on the device: under ``kdplug.device.autocast`` (bfloat16 or float16 on CUDA, with the
engine's GradScaler for float16; float32 on the CPU), the student in
``kdplug.device.memory_format`` (channels_last on CUDA), the teacher on the contiguous batch
with its gradients off, the same timm AdamW. On CUDA every timer reads after
``torch.cuda.synchronize()``. With CUDA (``--device cuda``) it also reports the engine's
images/s for student-only training and for distillation from 1 and 3 teachers. Each part is
written to ``--json`` as soon as it is measured, so a late failure keeps the earlier figures
(the failure is recorded under ``error``); all are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import kdplug


def clock(device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done (CUDA runs
    asynchronously: an unsynchronized timer measures the queueing, not the work)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_data(root: Path, size: int, copies: int) -> str:
    """Digits (``copies`` times over) saved to disk; a DATA spec at ``size`` pixels."""
    import datasets

    from kdplug.data import load_data

    dataset = load_data("sklearn:digits").dataset
    if copies > 1:
        dataset = datasets.concatenate_datasets([dataset] * copies)
    dataset.save_to_disk(str(root / "digits"))
    return f"disk:{root / 'digits'},image_size={size}"


def make_teacher(root: Path, name: str, arch: str, size: int, seed: int) -> str:
    """A randomly initialised student directory to serve as a teacher (timing only)."""
    import torch

    from kdplug.model_dir import save_student
    from kdplug.plugins import create

    torch.manual_seed(seed)
    model = create("students", f"timm:{arch}", 10, 1)
    classes = [str(c) for c in range(10)]
    save_student(
        root / name,
        model,
        architecture=arch,
        classes=classes,
        input_size=[1, size, size],
        mean=[0.3],
        std=[0.4],
    )
    return f"kdplug:{root / name}"


class HandKD:
    """A minimal KD step: teacher under no_grad, student, ``0.1 CE + 0.9 T^2 KL``, timm's
    AdamW; precision and memory format as the engine's on the device (``kdplug.device``).
    Without a teacher (``teacher=None``) it is a plain timm training step on CE."""

    def __init__(self, data: str, teacher: str | None, arch: str, device: str, seed: int):
        import timm
        import torch
        from timm.optim import create_optimizer_v2

        from kdplug.data import load_data
        from kdplug.device import grad_scaler, memory_format
        from kdplug.engines.distill import OPTIMIZER, WEIGHT_DECAY
        from kdplug.model_dir import load_classifier
        from kdplug.preprocess import data_normalization

        self.device = torch.device(device)
        self.source = load_data(data)
        self.teacher = None
        if teacher is not None:
            self.teacher = load_classifier(teacher.split(":", 1)[1]).to(self.device).eval()
            self.teacher.requires_grad_(False)  # as the engine's: autocast keeps no weight copy
        torch.manual_seed(seed)
        self.memory_format = memory_format(self.device)
        self.student = timm.create_model(
            arch, num_classes=len(self.source.classes), in_chans=self.source.in_chans
        ).to(self.device, memory_format=self.memory_format)
        mean, std = data_normalization(self.source)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.optimizer = create_optimizer_v2(
            self.student, opt=OPTIMIZER, lr=1e-3, weight_decay=WEIGHT_DECAY
        )
        self.scaler = grad_scaler(self.device)

    def step(self, x, y) -> None:
        import torch
        import torch.nn.functional as F

        from kdplug.device import autocast

        T = 4.0
        x = x.to(self.device, non_blocking=True)  # contiguous: the teacher's input
        y = y.to(self.device, non_blocking=True)
        with autocast(self.device):
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher(x).float()
            student_x = x.contiguous(memory_format=self.memory_format)
            logits = self.student((student_x - self.mean) / self.std).float()
        loss = F.cross_entropy(logits, y)
        if self.teacher is not None:
            kl = F.kl_div(
                F.log_softmax(logits / T, 1),
                F.log_softmax(target / T, 1),
                log_target=True,
                reduction="batchmean",
            )
            loss = 0.1 * loss + 0.9 * T * T * kl
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def hand_loop(data: str, teacher: str, arch: str, args: argparse.Namespace) -> list[float]:
    """Seconds per epoch of the minimal KD loop over the engine's batches."""
    from kdplug.data import batches

    hand, times = HandKD(data, teacher, arch, args.device, args.seed), []
    for epoch in range(args.epochs):
        start = clock(args.device)
        for x, y, _ in batches(
            hand.source, args.batch_size, shuffle=True, seed=args.seed, epoch=epoch, drop_last=True
        ):
            hand.step(x, y)
        times.append(clock(args.device) - start)
    return times


def step_ratio(data: str, teacher: str, arch: str, args: argparse.Namespace) -> float:
    """Engine step / hand step, median over the same decoded batches, taken turn about
    (data loading and files left out: the training step alone). The engine's parts are
    placed and fitted as ``distill`` places and fits them (teachers on the device)."""
    import torch

    from kdplug.data import batches
    from kdplug.engines.distill import (
        DistillConfig,
        Trainer,
        TrainRows,
        build_parts,
        fit_on_labeled_rows,
    )

    config = DistillConfig(
        student=f"timm:{arch}",
        train=data,
        teachers=[teacher],
        loss="kd,T=4",
        out="unused",
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    device = torch.device(args.device)
    parts = build_parts(config)
    parts.producer.to(device)  # as distill does: the teachers run where the batch is
    fit_on_labeled_rows(parts, config, device)
    rows = TrainRows(parts.train, None)
    trainer = Trainer(parts, config, device, len(rows) // args.batch_size)
    trainer.begin_epoch(0, args.epochs)
    hand = HandKD(data, teacher, arch, args.device, args.seed)
    hand_s, engine_s = [], []
    for x, y, idx in batches(rows, args.batch_size, shuffle=True, drop_last=True):
        start = clock(device)
        hand.step(x, y)
        middle = clock(device)
        trainer.step(x, y, idx)
        hand_s.append(middle - start)
        engine_s.append(clock(device) - middle)
    return statistics.median(engine_s) / statistics.median(hand_s)


class EpochClock:
    """An event-hook plugin recording when the engine starts and ends each epoch."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.marks: list[float] = []

    @kdplug.hookimpl
    def on_fit_start(self, run) -> None:
        self.marks = [clock(self.device)]

    @kdplug.hookimpl
    def on_epoch_end(self, run, epoch, metrics) -> None:
        self.marks.append(clock(self.device))

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def engine(
    data: str, teachers: list[str], arch: str, loss: str, out: Path, args: argparse.Namespace
) -> dict:
    """One ``kdplug.engines.distill`` run (what ``kdplug distill`` calls); its summary."""
    from kdplug.engines.distill import DistillConfig, distill

    config = DistillConfig(
        student=f"timm:{arch}",
        train=data,
        teachers=teachers,
        loss=loss,
        out=str(out),
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        overwrite=True,
        workers=args.workers,
    )
    return distill(config)


def overhead(root: Path, args: argparse.Namespace, save) -> dict:
    """Epoch times of hand loop and engine, then the step ratio; ``save(results)`` is called
    with what is measured so far after each part."""
    from kdplug.plugins import get_manager

    data = make_data(root, args.size, args.copies)
    teacher = make_teacher(root, "teacher", args.teacher, args.size, seed=1)
    epochs = EpochClock(args.device)
    get_manager().add(epochs, "bench-clock")
    hand, kdplug_times, ratios = [], [], []
    for repeat in range(args.repeats):
        # the two run back to back, alternating which goes first, and each pair is compared:
        # the load of a shared machine drifts over minutes, much less within one pair
        median = {}
        for which in ("hand", "kdplug") if repeat % 2 == 0 else ("kdplug", "hand"):
            if which == "hand":
                timed = hand_loop(data, teacher, args.student, args)[1:]
                hand += timed
            else:
                engine(data, [teacher], args.student, "kd,T=4", root / f"run{repeat}", args)
                timed = epochs.epochs()[1:]
                kdplug_times += timed
            median[which] = statistics.median(timed)
        ratios.append(median["kdplug"] / median["hand"])
    result = {
        "hand_epoch_s": [round(t, 3) for t in hand],
        "kdplug_epoch_s": [round(t, 3) for t in kdplug_times],
        "hand_median_s": round(statistics.median(hand), 3),
        "kdplug_median_s": round(statistics.median(kdplug_times), 3),
        "ratio_per_pair": [round(r, 3) for r in ratios],
        "ratio": round(statistics.median(ratios), 3),
        "ratio_of_fastest_epochs": round(min(kdplug_times) / min(hand), 3),
    }
    save(result)
    result["step_ratio"] = round(step_ratio(data, teacher, args.student, args), 3)
    save(result)
    return result


def throughput(root: Path, args: argparse.Namespace, save) -> dict:
    """Engine images/s (AMP on CUDA): student only, and KD from 1 and 3 teachers; ``save``
    as in ``overhead``. (``samples_per_s`` is read after the epoch's host sync.)"""
    data = make_data(root / "gpu", args.size, args.copies)
    teachers = [make_teacher(root, f"gpu-t{i}", args.teacher, args.size, seed=i) for i in range(3)]
    rates: dict = {}
    for name, chosen, loss in [
        ("student only", [], "ce"),
        ("1 teacher", teachers[:1], "kd,T=4"),
        ("3 teachers", teachers, "kd,T=4"),
    ]:
        out = root / f"gpu-{len(chosen)}-teachers"
        summary = engine(data, chosen, args.student, loss, out, args)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rates[name] = round(statistics.median(line["samples_per_s"] for line in lines[1:]), 1)
        rates[f"{name} peak memory GiB"] = round(summary["peak_memory"]["bytes"] / 2**30, 2)
        save(rates)
    return rates


class Results:
    """The results so far: printed and written to ``path`` (if any) after every part, so a
    failure later in the run keeps what was measured before it."""

    def __init__(self, path: str | None, header: dict):
        self.path = Path(path) if path else None
        self.data = dict(header)

    def part(self, key: str):
        """A ``save(value)`` callback that records ``value`` under ``key``."""

        def save(value) -> None:
            self.data[key] = value
            self.write()

        return save

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--teacher", default="test_resnet")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--copies", type=int, default=1, help="repeat the 1797 digits")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import timm
    import torch

    from kdplug.device import autocast_dtype, memory_format

    device = torch.device(args.device)
    header = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "args": vars(args),
        "precision": str(autocast_dtype(device) or torch.float32),
        "student_memory_format": str(memory_format(device)),
    }
    if device.type == "cuda":
        header["cuda"] = torch.cuda.get_device_name(device)
    results = Results(args.json, header)
    results.write()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            overhead(Path(tmp), args, results.part("overhead"))
            if device.type == "cuda":
                throughput(Path(tmp), args, results.part("images_per_s"))
    except Exception as exc:  # keep the figures measured so far, and say what failed
        results.data["error"] = f"{type(exc).__name__}: {exc}"
        results.write()
        print(json.dumps(results.data, indent=2))
        traceback.print_exc()
        sys.exit(1)
    print(json.dumps(results.data, indent=2))


if __name__ == "__main__":
    main()
