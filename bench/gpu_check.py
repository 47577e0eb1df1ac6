"""GPU check: kdplug's CUDA paths run end to end on one GPU, each a named PASS/FAIL/SKIP row.

What it checks, through kdplug's own engines (in this process, or the CLI where the CLI is
the point), on scikit-learn's digits as RGB images upsampled to ``--size`` pixels, the 1500
train rows ``--copies`` times over (no network); in this order, so the checks only a GPU
can answer come first:

- ``setup``: the data, and every teacher file built here: a small CNN trained briefly and
  saved as TorchScript (traced, with a tensor constant), torch.export (with a tensor
  attribute and a ``torch.arange(..., device=x.device)``) and ONNX; a timm model trained
  briefly, saved as safetensors (``timm:ARCH,checkpoint=...``) and as a student directory
  (``kdplug:DIR``); a LogisticRegression on the flattened pixels (``sklearn:...skops``);
  the CNN's logits on the train rows (``logits:...npy``).
- ``teacher placement``: every teacher kind moved as the engines move it and run on a
  batch on the device under autocast: its output and (modules) its weights are on the
  device; ``onnx CUDA provider``: whether onnxruntime ran on CUDA (SKIP without one).
- ``cache store``: ``kdplug cache`` of six kinds at once, 3 views (rebuilt on the device
  when distilling from it).
- ``distill`` of a timm student (AMP, channels_last, ``compile=True``, ``ema=True``) from
  live kdplug/TorchScript/export teachers, ``auto`` fitted on the val rows
  (``calibration_data``); ``distill from store``.
- ``step settings``: in the engine's step the student gets channels_last input and runs
  in the autocast dtype, the teacher gets the contiguous batch and has no gradients, and
  the step's peak memory with a teacher against the hand KD loop's.
- ``images/s`` of the distill step against a plain timm training loop with the same
  settings (``bench/distill_overhead.py``'s ``HandKD``: same model, batch, autocast dtype,
  channels_last, timm AdamW; timers read after ``torch.cuda.synchronize()``), labels only
  and with one teacher; target >= 0.9x on CUDA.
- ``torchrun 1 process``: ``kdplug distill --nproc-per-node 1 --device cuda`` (NCCL); on a
  CPU run the NCCL row is SKIP and the same command runs on gloo.
- ``label all kinds``, then ``label KIND`` and ``cache KIND`` for every teacher kind
  (timm, kdplug, torchscript, export, onnx, sklearn, logits, and ``store:`` of the store).
- ``resume``: a run stopped after epoch 1 and resumed ends with the uninterrupted run's
  metrics (reported as the largest difference; a GPU without determinism flags may differ).

GPU utilisation is sampled every 0.25 s in a background thread (``torch.cuda.utilization``
where pynvml is installed, else ``nvidia-smi``; the header says which) and each row shows
its mean and max.

Command (estimated 5 to 6 minutes on one H200, not yet measured; checks not started within
``--budget`` seconds, 420 by default, are SKIP, so it stays under 8 minutes):

    .venv/bin/python bench/gpu_check.py --out gpu-check

Rehearsal on a CPU (about 7 minutes on 2 loaded cores, most of it ``torch.compile``; NCCL
and the onnxruntime CUDA provider are SKIP):

    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_check.py --device cpu --quick --out /tmp/gc

Output: ``OUT/results.md`` (a table: check, status, seconds, GPU utilisation, figures or the
one-line error) and ``OUT/results.json`` (the same rows, with the kdplug warnings each
raised), rewritten after every check, so a run cut short keeps what ran (a check still
running shows as RUNNING); ``OUT/log.txt`` has kdplug's log and ``OUT/errors.log`` every
failure's traceback. Exit code 1 when any row is FAIL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import kdplug  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_overhead import HandKD, clock  # noqa: E402

KINDS = ("timm", "kdplug", "torchscript", "export", "onnx", "sklearn", "logits", "store")
TARGET = 0.9  # distill step images/s over the plain loop's, on CUDA


class Skip(Exception):
    """A check that cannot run here (the reason is the message)."""


class CheckFailed(Exception):
    """A check that ran and missed what it checks (its figures are kept)."""


# ---- the report -----------------------------------------------------------------------


class Utilisation:
    """GPU utilisation (%) sampled every 0.25 s in a background thread."""

    def __init__(self, device):
        import torch

        self.samples: list[tuple[float, float]] = []
        self.read = None
        if device.type != "cuda":
            self.method = "none (not a CUDA run)"
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            torch.cuda.utilization(index)
            self.method = "torch.cuda.utilization"
            self.read = lambda: float(torch.cuda.utilization(index))
        except Exception as exc:  # no pynvml: ask nvidia-smi
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[index:]
            physical = visible[0] if visible and visible[0].strip().isdigit() else str(index)
            command = [
                "nvidia-smi",
                f"--id={physical}",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
            ]
            if shutil.which("nvidia-smi") is None:
                self.method = f"none (torch.cuda.utilization: {one_line(exc)}; no nvidia-smi)"
                return
            self.method = "nvidia-smi (torch.cuda.utilization: " + one_line(exc) + ")"
            self.read = lambda: float(
                subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.split()[0]
            )
        self.stopped = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stopped.wait(0.25):
            try:
                self.samples.append((time.time(), self.read()))
            except Exception:
                pass  # a missed sample

    def between(self, start: float, end: float) -> dict | None:
        values = [v for t, v in list(self.samples) if start <= t <= end]
        if not values:
            return None
        return {"mean": round(statistics.mean(values), 1), "max": max(values), "n": len(values)}

    def stop(self) -> None:
        if self.read is not None:
            self.stopped.set()


class Warnings(logging.Handler):
    """kdplug's WARNING lines while a check runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(one_line(record.getMessage()))


class Report:
    """The rows so far, in ``out/results.json`` and ``out/results.md`` after every check."""

    def __init__(self, out: Path, header: dict, utilisation: Utilisation, budget: float):
        self.out, self.header, self.utilisation = out, header, utilisation
        self.deadline = time.perf_counter() + budget
        self.rows: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        (out / "errors.log").write_text("")

    def run(self, name: str, check, *args) -> bool:
        """Run ``check(figures, *args)`` as the row ``name``; True when it passed."""
        figures: dict[str, Any] = {}
        row = {"check": name, "status": "RUNNING", "seconds": None, "figures": figures}
        self.rows.append(row)
        self.write()
        captured = Warnings()
        logging.getLogger("kdplug").addHandler(captured)
        started, wall = time.perf_counter(), time.time()
        try:
            if started > self.deadline:
                raise Skip("not started: the --budget of seconds was spent")
            check(figures, *args)
            row["status"] = "PASS"
        except Skip as exc:
            row["status"], row["why"] = "SKIP", str(exc)
        except Exception as exc:
            row["status"], row["error"] = "FAIL", one_line(exc)
            with open(self.out / "errors.log", "a") as fh:
                fh.write(f"== {name}\n{traceback.format_exc()}\n")
        finally:
            logging.getLogger("kdplug").removeHandler(captured)
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["gpu_utilisation"] = self.utilisation.between(wall, time.time())
        row["warnings"] = captured.lines[:5]
        self.write()
        print(f"{row['status']:4} {name} ({row['seconds']} s) {row.get('error', '')}", flush=True)
        return row["status"] == "PASS"

    def write(self) -> None:
        data = {**self.header, "rows": self.rows}
        replace(self.out / "results.json", json.dumps(data, indent=2, default=str) + "\n")
        replace(self.out / "results.md", self.markdown())

    def markdown(self) -> str:
        lines = [f"# kdplug GPU check, {self.header['date']}", ""]
        lines += [f"- {key}: {value}" for key, value in self.header.items() if key != "date"]
        lines += ["", "| check | status | s | GPU util % mean/max | figures, or why |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        for row in self.rows:
            util = row.get("gpu_utilisation")
            util = f"{util['mean']}/{util['max']}" if util else ""
            said = row.get("error") or row.get("why") or ""
            figures = "; ".join(f"{k}={v}" for k, v in row["figures"].items())
            text = "; ".join(part for part in (said, figures) if part).replace("|", "/")
            seconds = "" if row["seconds"] is None else row["seconds"]
            lines.append(f"| {row['check']} | {row['status']} | {seconds} | {util} | {text} |")
        return "\n".join(lines) + "\n"


def replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def one_line(value: Any) -> str:
    """An exception (or message) as one line of at most 300 characters."""
    if isinstance(value, BaseException):
        text = str(value).strip().splitlines()
        value = f"{type(value).__name__}: {text[0] if text else ''}"
    return " ".join(str(value).split())[:300]


# ---- the data and the teachers ---------------------------------------------------------


def small_cnn(size: int, factory: bool):
    """A CNN whose saved forms break on a device unless kdplug moves them right: it
    ``view``s a conv activation (fails on channels_last input), adds a plain tensor
    attribute (a constant ``.to()`` leaves behind) and, with ``factory``, a
    ``torch.arange(..., device=x.device)`` (baked as CPU by torch.export)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.pool = torch.nn.AvgPool2d(size // 4)
            self.head = torch.nn.Linear(32 * 4, 10)
            self.offset = torch.zeros(10)
            self.factory = factory

        def forward(self, x):
            h = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
            z = self.head(h.view(h.shape[0], -1)) + self.offset
            if self.factory:
                z = z + 0.0 * torch.arange(z.shape[1], device=x.device)
            return z

    return Net()


def save_splits(root: Path, size: int, copies: int) -> dict[str, str]:
    """Digits as RGB images (3 channels: with one, channels_last and contiguous are the same
    layout and a teacher fed the wrong one would not show it): train (1500 rows, ``copies``
    times over) and val (the other 297), as DATA specs at ``size`` pixels."""
    import datasets
    import numpy as np

    from kdplug.data import load_data

    digits = load_data("sklearn:digits").dataset
    digits = digits.map(lambda row: {"image": row["image"].convert("RGB")})
    order = np.random.default_rng(0).permutation(len(digits))
    train = digits.select(sorted(order[:1500].tolist()))
    parts = {
        "train": datasets.concatenate_datasets([train] * copies),
        "val": digits.select(sorted(order[1500:].tolist())),
    }
    specs = {}
    for name, dataset in parts.items():
        dataset.save_to_disk(str(root / name))
        specs[name] = f"disk:{root / name},image_size={size}"
    return specs


def decoded(spec: str, workers: int):
    """All rows of ``spec`` through kdplug's data path, in order: x [N, 3, S, S], y [N]."""
    import torch

    from kdplug.data import batches, load_data

    parts = list(batches(load_data(spec), 512, workers=workers))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def fit_briefly(model, x, y, device, epochs: int, batch: int = 128):
    """Adam on raw [0, 1] pixels for ``epochs`` (teachers only need to be better than
    chance); the model is returned in eval mode on the CPU."""
    import torch

    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=generator).split(batch):
            loss = torch.nn.functional.cross_entropy(model(x[rows].to(device)), y[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.cpu().eval()


def onnx_graph(model, size: int, path: Path) -> None:
    """``model`` (a ``small_cnn``) as an ONNX graph with a dynamic batch."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = size // 4
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1] * 4, strides=[2, 2]
        ),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("AveragePool", ["r2"], ["p"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "head.weight", "head.bias"], ["y"], transB=1),
    ]
    weights = [
        numpy_helper.from_array(value.detach().numpy().astype(np.float32), name)
        for name, value in model.state_dict().items()
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 10])],
        weights,
    )
    graph_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    graph_model.ir_version = 8
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))


def build_teachers(figures: dict, ctx: Context) -> None:
    """The data and every teacher file; ``ctx.specs`` maps each kind to its spec."""
    import numpy as np
    import skops.io
    import timm
    import torch
    from safetensors.torch import save_file
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from kdplug.model_dir import save_student

    args, root, device = ctx.args, ctx.root, ctx.device
    ctx.data = save_splits(root, args.size, args.copies)
    ctx.x, ctx.y = decoded(ctx.data["train"], args.workers)
    figures.update(train_rows=len(ctx.x), shape=list(ctx.x.shape[1:]))
    raw = "mean=0,std=1"  # the models here are trained on the [0, 1] pixels
    torch.manual_seed(0)
    cnn = small_cnn(args.size, factory=True)
    cnn = fit_briefly(cnn, ctx.x, ctx.y, device, args.teacher_epochs)
    plain = small_cnn(args.size, factory=False)
    plain.load_state_dict(cnn.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(plain, ctx.x[:4]).save(str(root / "cnn.ts"))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(cnn, (ctx.x[:4],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(root / "cnn.pt2"))
    onnx_graph(cnn, args.size, root / "cnn.onnx")
    with torch.no_grad():
        logits = torch.cat([cnn(chunk) for chunk in ctx.x.split(1024)])
    np.save(root / "cnn-logits.npy", logits.numpy())
    torch.manual_seed(1)
    model = timm.create_model(args.teacher, num_classes=10, in_chans=3)
    model = fit_briefly(model, ctx.x, ctx.y, device, args.teacher_epochs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "timm.safetensors")
    save_student(
        root / "student-teacher",
        model,
        architecture=args.teacher,
        classes=[str(c) for c in range(10)],
        input_size=[3, args.size, args.size],
        mean=[0.0] * 3,
        std=[1.0] * 3,
    )
    rows = min(len(ctx.x), 1500)
    with warnings.catch_warnings():  # not converged in 200 iterations: good enough here
        warnings.simplefilter("ignore", ConvergenceWarning)
        logistic = LogisticRegression(max_iter=200).fit(
            ctx.x[:rows].flatten(1).numpy(), ctx.y[:rows]
        )
    skops.io.dump(logistic, root / "logreg.skops")
    ctx.specs = {
        "timm": f"timm:{args.teacher},checkpoint={root / 'timm.safetensors'},{raw}",
        "kdplug": f"kdplug:{root / 'student-teacher'}",
        "torchscript": f"torchscript:{root / 'cnn.ts'},allow_code=true,{raw}",
        "export": f"export:{root / 'cnn.pt2'},{raw}",
        "onnx": f"onnx:{root / 'cnn.onnx'},{raw}",
        "sklearn": f"sklearn:{root / 'logreg.skops'}",
        "logits": f"logits:{root / 'cnn-logits.npy'}",
        "store": f"store:{root / 'store'},teacher=0",  # made by the check "cache store ..."
    }
    figures["teacher_files"] = sorted(p.name for p in root.iterdir() if p.suffix or p.is_dir())


class Context:
    """What the checks share: options, device, temp dir, data specs, teacher specs."""

    def __init__(self, args: argparse.Namespace, device, root: Path):
        self.args, self.device, self.root = args, device, root
        self.data: dict[str, str] = {}
        self.specs: dict[str, str] = {}
        self.x = self.y = None
        # a student below this best val accuracy did not learn (not judged on --quick sizes)
        self.least_accuracy = None if args.quick else 0.3


# ---- the checks ------------------------------------------------------------------------


def same_device(a, b) -> bool:
    import torch

    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )


def placement(figures: dict, ctx: Context) -> None:
    """Each teacher kind, moved as the engines move it, answers on the device."""
    import torch

    from kdplug.data import load_data
    from kdplug.device import autocast
    from kdplug.teachers import build_teacher_set

    source = load_data(ctx.data["train"])
    x = ctx.x[:8].to(ctx.device)
    index = torch.arange(8)
    wrong = []
    for kind in KINDS:
        if kind == "store" and not (ctx.root / "store" / "store.json").exists():
            figures[kind] = "no store (cache store failed)"
            continue
        teachers = build_teacher_set([ctx.specs[kind]], source.classes, data=source)
        teachers.check_data(source)
        teachers.to(ctx.device)
        teacher = teachers.teachers[0]
        with torch.inference_mode(), autocast(ctx.device):
            z = teacher(x, index) if getattr(teacher, "uses_row_index", False) else teacher(x)
        z = torch.as_tensor(z)
        figures[kind] = f"{z.device} {str(z.dtype).replace('torch.', '')}"
        held = []
        if isinstance(teacher, torch.nn.Module):
            held = [t.device for t in (*teacher.parameters(), *teacher.buffers())]
        if not same_device(z.device, ctx.device) or any(
            not same_device(d, ctx.device) for d in held
        ):
            wrong.append(kind)
    if wrong:
        raise CheckFailed(f"outputs or weights not on {ctx.device}: {', '.join(wrong)}")


def onnx_provider(figures: dict, ctx: Context) -> None:
    """An ``onnx:`` teacher on a CUDA batch runs on onnxruntime's CUDA provider."""
    import onnxruntime as ort
    import torch

    from kdplug.plugins import create

    available = ort.get_available_providers()
    figures["onnxruntime"] = ort.__version__
    figures["providers"] = ",".join(p.replace("ExecutionProvider", "") for p in available)
    if ctx.device.type != "cuda":
        raise Skip("not a CUDA run")
    if "CUDAExecutionProvider" not in available:
        raise Skip(f"onnxruntime {ort.__version__} has no CUDA provider (onnxruntime-gpu)")
    captured = Warnings()
    logging.getLogger("kdplug").addHandler(captured)
    try:
        teacher = create("teachers", ctx.specs["onnx"])
        with torch.inference_mode():
            z = teacher(ctx.x[:64].to(ctx.device))
    finally:
        logging.getLogger("kdplug").removeHandler(captured)
    figures["output"] = str(z.device)
    fallback = [line for line in captured.lines if "runs on the CPU" in line]
    if fallback:
        raise CheckFailed(fallback[0])


def cache(figures: dict, ctx: Context, kinds: list[str], out: str, views: int) -> None:
    """``kdplug cache`` of ``kinds`` over the train rows."""
    from kdplug.engines.cache import CacheConfig, run_cache

    config = CacheConfig(
        teachers=[ctx.specs[k] for k in kinds],
        data=[ctx.data["train"]],
        out=str(ctx.root / out),
        views=views,
        augment="scale=0.5;1,hflip=0" if views > 1 else None,
        topk=5,
        batch_size=ctx.args.batch_size,
        device=ctx.args.device,
        progress=False,
        overwrite=True,
    )
    started = clock(ctx.device)
    info = run_cache(config)
    seconds = clock(ctx.device) - started
    rows = sum(split["rows"] for split in info["splits"])
    size = sum(p.stat().st_size for p in (ctx.root / out).rglob("*") if p.is_file())
    figures.update(
        rows=rows, views=views, rows_per_s=round(rows / seconds, 1), store_mb=round(size / 2**20, 2)
    )


def label(figures: dict, ctx: Context, kinds: list[str], out: str) -> None:
    """``kdplug label`` with ``kinds`` over the train rows (their labels score it)."""
    from kdplug.engines.label import LabelConfig, run_label

    config = LabelConfig(
        teachers=[ctx.specs[k] for k in kinds],
        data=ctx.data["train"],
        out=str(ctx.root / out),
        batch_size=2 * ctx.args.batch_size,
        device=ctx.args.device,
        progress=False,
        overwrite=True,
    )
    report = run_label(config)
    figures.update(
        rows=report["rows"],
        rows_per_s=round(report["rows"] / report["seconds"], 1),
        coverage=round(report["coverage"], 3),
    )
    if report.get("eval"):
        figures["accuracy_all"] = round(report["eval"]["accuracy_all"], 3)


def distill_config(ctx: Context, out: str, **values):
    from kdplug.engines.distill import DistillConfig

    config = {
        "student": f"timm:{ctx.args.student}",
        "train": ctx.data["train"],
        "val": ctx.data["val"],
        "out": str(ctx.root / out),
        "epochs": ctx.args.epochs,
        "batch_size": ctx.args.batch_size,
        "device": ctx.args.device,
        "workers": ctx.args.workers,
        "overwrite": True,
        **values,
    }
    return DistillConfig(**config)


def distill_figures(figures: dict, summary: dict, least: float | None) -> None:
    figures.update(
        best_val_accuracy=rounded(summary["best_val_accuracy"]),
        samples_per_s_last_epoch=round(summary.get("_last_rate", summary["samples_per_s"]), 1),
        samples_per_s_mean=round(summary["samples_per_s"], 1),
        peak_memory_gib=round(summary["peak_memory"]["bytes"] / 2**30, 2),
        device=summary["device"],
    )
    accuracy = summary["best_val_accuracy"]
    if least is not None and (accuracy is None or accuracy < least):
        raise CheckFailed(f"the student did not learn: best val accuracy {accuracy} < {least}")


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def last_rate(out: Path) -> float:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["samples_per_s"]


def distill_live(figures: dict, ctx: Context) -> None:
    """A timm student with AMP, channels_last, torch.compile and EMA from live teachers."""
    import torch

    from kdplug.device import autocast_dtype, memory_format
    from kdplug.engines.distill import distill

    teachers = [ctx.specs[k] for k in ("kdplug", "torchscript", "export")]
    config = distill_config(
        ctx,
        "distill",
        teachers=teachers,
        compile=True,
        ema=True,
        calibration_data=ctx.data["val"],  # rows the teachers never saw: auto is fitted
    )
    summary = distill(config)
    figures["fitted"] = ",".join(sorted(summary.get("fitted") or {})) or "nothing"
    summary["_last_rate"] = last_rate(ctx.root / "distill")
    figures["autocast"] = str(autocast_dtype(ctx.device) or torch.float32).replace("torch.", "")
    figures["student_format"] = str(memory_format(ctx.device)).replace("torch.", "")
    distill_figures(figures, summary, ctx.least_accuracy)


def distill_store(figures: dict, ctx: Context) -> None:
    """The same student from the teacher store (its views rebuilt in the step)."""
    from kdplug.engines.distill import distill

    if not (ctx.root / "store" / "store.json").exists():
        raise CheckFailed("no store: the check 'cache store' failed")
    summary = distill(distill_config(ctx, "distill-store", store=str(ctx.root / "store")))
    summary["_last_rate"] = last_rate(ctx.root / "distill-store")
    distill_figures(figures, summary, ctx.least_accuracy)


def engine_trainer(ctx: Context, teachers: list[str], loss: str, steps: int):
    """The distill engine's Trainer, placed as ``distill`` places it (no files)."""
    from kdplug.engines.distill import Trainer, build_parts

    config = distill_config(ctx, "unused", teachers=teachers, loss=loss, combiner="mean")
    parts = build_parts(config)
    if parts.producer is not None:
        parts.producer.to(ctx.device)
    trainer = Trainer(parts, config, ctx.device, steps)
    trainer.begin_epoch(0, 1)
    return trainer


def step_batches(ctx: Context, count: int) -> list:
    """``count`` CPU batches ``(x, y, idx)`` of the decoded train rows (pinned on CUDA)."""
    import torch

    size, out = ctx.args.batch_size, []
    for i in range(count):
        rows = torch.arange(i * size, (i + 1) * size) % len(ctx.x)
        x, y = ctx.x[rows], ctx.y[rows]
        if ctx.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        out.append((x, y, rows))
    return out


def run_steps(step, batches: list, device) -> float:
    """Images/s of ``step`` over ``batches`` (timers synchronized)."""
    start = clock(device)
    for x, y, idx in batches:
        step(x, y, idx)
    return sum(len(b[0]) for b in batches) / (clock(device) - start)


def step_speed(figures: dict, ctx: Context, with_teacher: bool) -> None:
    """Distill step against the plain loop, taking turns in blocks of ``--steps``."""
    import torch

    teacher = ctx.specs["kdplug"] if with_teacher else None
    loss = "kd,T=4" if with_teacher else "ce"
    batches = step_batches(ctx, ctx.args.steps)
    trainer = engine_trainer(ctx, [teacher] if teacher else [], loss, len(batches))
    hand = HandKD(ctx.data["train"], teacher, ctx.args.student, ctx.args.device, 0)
    steps = {"engine": trainer.step, "plain": lambda x, y, idx: hand.step(x, y)}
    for step in steps.values():  # warm-up: allocator, cuDNN, autocast caches
        run_steps(step, batches[:3], ctx.device)
    rates: dict[str, list[float]] = {"engine": [], "plain": []}
    for turn in range(ctx.args.rounds):
        for name in ("engine", "plain") if turn % 2 == 0 else ("plain", "engine"):
            rates[name].append(run_steps(steps[name], batches, ctx.device))
    engine, plain = (statistics.median(rates[k]) for k in ("engine", "plain"))
    figures.update(
        engine_images_per_s=round(engine, 1),
        plain_images_per_s=round(plain, 1),
        ratio=round(engine / plain, 3),
        batch=ctx.args.batch_size,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )
    if ctx.device.type == "cuda" and engine / plain < TARGET:
        raise CheckFailed(f"distill step at {engine / plain:.2f}x the plain loop (< {TARGET}x)")


def memory_format_name(x) -> str:
    """``contiguous``, ``channels_last``, ``both`` (one channel, or 1x1 images) or
    ``strided``."""
    import torch

    flat, last = x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
    return {(True, True): "both", (True, False): "contiguous", (False, True): "channels_last"}.get(
        (flat, last), "strided"
    )


def peak_bytes(step, batches: list, device) -> int | None:
    """Peak CUDA memory over ``step`` on ``batches`` (None off CUDA)."""
    import torch

    run_steps(step, batches[:2], device)
    if device.type != "cuda":
        run_steps(step, batches[2:], device)
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run_steps(step, batches[2:], device)
    return torch.cuda.max_memory_allocated(device)


def step_settings(figures: dict, ctx: Context) -> None:
    """What the engine's step feeds the student and the teacher, and its peak memory."""
    import gc

    import torch

    from kdplug.device import autocast_dtype, memory_format

    teacher_spec = ctx.specs["kdplug"]
    batches = step_batches(ctx, 5)
    trainer = engine_trainer(ctx, [teacher_spec], "kd,T=4", len(batches))
    seen: dict[str, str] = {}
    trainer.model.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("student_input", memory_format_name(a[0]))
    )
    trainer.model.register_forward_hook(
        lambda m, a, o: seen.__setitem__("student_output", str(o.dtype).replace("torch.", ""))
    )
    teacher = trainer.producer.teachers[0]
    teacher.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("teacher_input", memory_format_name(a[0]))
    )
    engine_peak = peak_bytes(trainer.step, batches, ctx.device)
    with_grad = sum(
        p.requires_grad
        for t in trainer.producer.teachers
        if isinstance(t, torch.nn.Module)
        for p in t.parameters()
    )
    del trainer, teacher
    gc.collect()
    hand = HandKD(ctx.data["train"], teacher_spec, ctx.args.student, ctx.args.device, 0)
    hand_peak = peak_bytes(lambda x, y, idx: hand.step(x, y), batches, ctx.device)
    figures.update(seen, teacher_weights_with_grad=with_grad)
    if engine_peak is not None:
        figures["engine_peak_gib"] = round(engine_peak / 2**30, 3)
        figures["hand_peak_gib"] = round(hand_peak / 2**30, 3)
    wanted = {
        "student_input": "channels_last"
        if memory_format(ctx.device) == torch.channels_last
        else "contiguous",
        "student_output": str(autocast_dtype(ctx.device) or torch.float32).replace("torch.", ""),
        "teacher_input": "contiguous",
    }
    wrong = [
        f"{k} {seen.get(k)} (want {v})" for k, v in wanted.items() if seen.get(k) not in (v, "both")
    ]
    if with_grad:
        wrong.append(f"{with_grad} teacher weights require grad")
    if engine_peak is not None and engine_peak > 1.25 * hand_peak + 2**26:
        wrong.append(
            f"peak {engine_peak / 2**30:.2f} GiB vs the hand loop's {hand_peak / 2**30:.2f}"
        )
    if wrong:
        raise CheckFailed("; ".join(wrong))


class StopAfter:
    """An event hook that interrupts a distill run at the end of epoch ``epoch``."""

    class Interrupted(BaseException):
        """Raised from the hook like Ctrl-C (listeners' Exceptions are only warnings)."""

    def __init__(self):
        self.epoch: int | None = None

    @kdplug.hookimpl
    def on_epoch_end(self, run, epoch, metrics) -> None:
        if self.epoch is not None and epoch == self.epoch:
            raise StopAfter.Interrupted()


def resume(figures: dict, ctx: Context, stopper: StopAfter) -> None:
    """A run stopped after epoch 1 and resumed ends as the uninterrupted run does."""
    from kdplug.engines.distill import distill

    values = {"teachers": [ctx.specs["kdplug"]], "ema": True, "epochs": 2}
    distill(distill_config(ctx, "whole", **values))
    stopper.epoch = 1
    try:
        distill(distill_config(ctx, "resumed", **values))
        raise CheckFailed("the run was not interrupted")
    except StopAfter.Interrupted:
        pass
    finally:
        stopper.epoch = None
    distill(distill_config(ctx, "resumed", **values, resume=True, overwrite=False))
    keys = ("loss", "ce", "kd", "val_accuracy", "val_nll")
    runs = [
        [json.loads(line) for line in (ctx.root / out / "metrics.jsonl").read_text().splitlines()]
        for out in ("whole", "resumed")
    ]
    worst = max(abs(a[k] - b[k]) for a, b in zip(*runs) for k in keys if a[k] is not None)
    figures.update(epochs=len(runs[1]), largest_difference=worst)
    if len(runs[0]) != len(runs[1]) or worst > 0:
        raise CheckFailed(f"resumed metrics differ from the uninterrupted run's by {worst:.3g}")


def torchrun(figures: dict, ctx: Context, device: str) -> None:
    """``kdplug distill --nproc-per-node 1 --device DEVICE`` in a subprocess."""
    out = ctx.root / f"torchrun-{device}"
    command = [
        sys.executable,
        "-m",
        "kdplug",
        "distill",
        "--nproc-per-node",
        "1",
        "--device",
        device,
        "--student",
        f"timm:{ctx.args.student}",
        "--teacher",
        ctx.specs["kdplug"],
        "--train",
        ctx.data["train"],
        "--val",
        ctx.data["val"],
        "--epochs",
        "1",
        "--batch-size",
        str(ctx.args.batch_size),
        "--workers",
        str(ctx.args.workers),
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    figures["exit"] = result.returncode
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise CheckFailed(lines[-1] if lines else f"exit code {result.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    figures.update(
        device=summary["device"],
        best_val_accuracy=rounded(summary["best_val_accuracy"]),
        samples_per_s=round(summary["samples_per_s"], 1),
    )


def nccl(figures: dict, ctx: Context) -> None:
    if ctx.device.type != "cuda":
        raise Skip("NCCL needs CUDA (the same command runs on gloo in the next row)")
    torchrun(figures, ctx, "cuda")


# ---- main ------------------------------------------------------------------------------

QUICK = {
    "size": 16,
    "copies": 1,
    "student": "test_resnet",
    "teacher": "test_resnet",
    "batch_size": 64,
    "epochs": 2,
    "teacher_epochs": 6,
    "budget": 1200,
    "workers": 0,
    "steps": 4,
    "rounds": 2,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="results.json/.md go here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: " + str(QUICK))
    parser.add_argument("--size", type=int, default=64, help="image pixels (a multiple of 4)")
    parser.add_argument("--copies", type=int, default=4, help="repeat the 1500 train rows")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher", default="resnet18", help="the timm/kdplug teachers' arch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=2, help="training the teachers")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks of each loop")
    parser.add_argument(
        "--budget", type=float, default=420, help="seconds; checks not started by then are SKIP"
    )
    args = parser.parse_args()
    if args.quick:
        given = {a.dest for a in parser._actions if f"--{a.dest.replace('_', '-')}" in sys.argv}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    if args.size % 4:
        parser.error("--size must be a multiple of 4")
    return args


def header(args: argparse.Namespace, device, utilisation: Utilisation) -> dict:
    import onnxruntime
    import timm
    import torch

    from kdplug.device import autocast_dtype

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": f"torch {torch.__version__}, timm {timm.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, kdplug {kdplug.__version__}",
        "autocast": str(autocast_dtype(device) or "none (float32)"),
        "gpu_utilisation": utilisation.method,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "device")},
    }


def main() -> int:
    args = parse_args()
    from kdplug.device import pick_device
    from kdplug.plugins import get_manager

    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("kdplug")
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(out / "log.txt", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    utilisation = Utilisation(device)
    report = Report(out, header(args, device, utilisation), utilisation, args.budget)
    stopper = StopAfter()
    get_manager().add(stopper, "gpu-check-stop")
    with tempfile.TemporaryDirectory(prefix="kdplug-gpu-check-") as tmp:
        ctx = Context(args, device, Path(tmp))
        if report.run("setup: data and teacher files", build_teachers, ctx):
            checks(report, ctx, stopper)
    utilisation.stop()
    failed = [row["check"] for row in report.rows if row["status"] == "FAIL"]
    print(f"{len(report.rows)} checks, {len(failed)} failed; see {out / 'results.md'}")
    return 1 if failed else 0


def checks(report: Report, ctx: Context, stopper: StopAfter) -> None:
    """Every check after the setup: what only a GPU shows first, the per-kind label and
    cache runs last (a later check may use an earlier one's files)."""
    report.run("onnx CUDA provider", onnx_provider, ctx)
    report.run(
        "cache store (timm, kdplug, torchscript, export, onnx, sklearn; 3 views)",
        cache,
        ctx,
        ["timm", "kdplug", "torchscript", "export", "onnx", "sklearn"],
        "store",
        3,
    )
    report.run("teacher placement (every kind)", placement, ctx)
    report.run("distill (AMP, channels_last, compile, EMA)", distill_live, ctx)
    report.run("distill from store", distill_store, ctx)
    report.run("step settings and peak memory", step_settings, ctx)
    report.run("images/s: distill step vs plain timm loop, labels only", step_speed, ctx, False)
    report.run("images/s: distill step vs hand KD loop, 1 teacher", step_speed, ctx, True)
    report.run("torchrun 1 process, NCCL", nccl, ctx)
    if ctx.device.type != "cuda":
        report.run("torchrun 1 process, gloo (CPU stand-in)", torchrun, ctx, "cpu")
    report.run("label all kinds", label, ctx, list(KINDS), "label-all")
    for kind in KINDS:
        report.run(f"label {kind}", label, ctx, [kind], f"label-{kind}")
    for kind in KINDS:
        report.run(f"cache {kind}", cache, ctx, [kind], f"cache-{kind}", 1)
    report.run("resume vs uninterrupted (2 epochs)", resume, ctx, stopper)


if __name__ == "__main__":
    sys.exit(main())
