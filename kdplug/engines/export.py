"""``kdplug export``: a student directory as one deployable file, checked by running it.

The exported model is the student as ``kdplug eval`` runs it (``kdplug.model_dir.
load_classifier``): for an image student, float32 ``[N, C, H, W]`` images in ``[0, 1]`` of
any batch size and any height and width, resized to the student's ``input_size`` (bilinear,
antialiased) and normalized with its ``mean`` and ``std`` inside the file; for a tabular
student, ``[N, D]`` feature rows (its feature normalization is part of the model). The
output is the logits ``[N, num_classes]`` in the order of the student's classes.

The file is written to a temporary sibling, run on real rows with the runtime that will
serve it (onnxruntime, ``torch.jit.load``, ``torch.export.load``) at two batch sizes (and,
for images, two image sizes), compared with the student, and only then moved into place.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdplug.errors import UsageError

log = logging.getLogger("kdplug")

FORMATS = ("onnx", "torchscript", "export")
SUFFIXES = {".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript", ".pt2": "export"}
TOLERANCE = 1e-4  # max abs difference of the logits, exported file against the student
INPUT_NAME, OUTPUT_NAME = "input", "logits"
CONFIG_NAME = "config.json"  # the student's config, carried inside the exported file
ONNX_OPSET = 18  # Resize with antialias


class Deployable(torch.nn.Module):
    """The student on ``[0, 1]`` images of any size: resized to ``size`` (always, an
    identity at that size, so that no shape test is traced), then its own classifier (the
    normalization and the network). ``size`` None: rows pass as they are (tabular)."""

    def __init__(self, classifier: torch.nn.Module, size: tuple[int, int] | None):
        super().__init__()
        self.classifier = classifier
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            x = F.interpolate(
                x, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        return self.classifier(x)


def pick_format(fmt: str | None, out: str) -> str:
    """``fmt``, else the one ``out``'s suffix names (said in a log line)."""
    if fmt is not None:
        return fmt
    found = SUFFIXES.get(Path(out).suffix.lower())
    if found is None:
        known = ", ".join(f"{s} ({f})" for s, f in SUFFIXES.items())
        raise UsageError(f"--out {out}: give --format {'|'.join(FORMATS)} (suffixes: {known})")
    log.info("--format %s (from the suffix of %s)", found, out)
    return found


def check_rows(model_dir: str, data: str | None, rows: int) -> tuple[torch.Tensor, str]:
    """The first ``rows`` rows of ``data`` (else of the data the distill run that wrote the
    student validated or trained on), and a line saying which rows they are."""
    from kdplug.data import load_data
    from kdplug.engines.eval import check_readable
    from kdplug.model_dir import read_config

    config = read_config(model_dir)
    spec, origin = (data, "--data") if data is not None else run_data(model_dir)
    try:
        source = load_data(spec)
    except UsageError as exc:
        if data is not None:
            raise
        message = f"{origin} names {spec}, which cannot be read ({exc}); give --data DATA"
        raise UsageError(message) from None
    check_readable(config, source, spec)
    count = min(rows, len(source))
    if count < 2:
        raise UsageError(f"{spec}: {count} row; the check needs 2 or more (two batch sizes)")
    x, _, _ = source.batch(list(range(count)))
    return x, f"the first {count} rows of {spec} ({origin})"


def run_data(model_dir: str) -> tuple[str, str]:
    """The val (else train) DATA spec of the distill run whose student is ``model_dir``,
    from its summary.json, and where it was read."""
    from kdplug.model_dir import student_path

    folder = student_path(model_dir)
    summary = folder.parent / "summary.json"
    try:
        recorded = json.loads(summary.read_text(encoding="utf-8"))["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{folder} is not in a distill run directory whose summary.json names its data: "
            "give --data DATA, rows the student reads, to check the export on"
        ) from None
    for split in ("val", "train"):
        if isinstance(recorded.get(split), dict) and recorded[split].get("spec"):
            return recorded[split]["spec"], f"the run's {split} data, from {summary}"
    raise UsageError(f"{summary} names no val or train data: give --data DATA")


def export_student(
    model_dir: str,
    fmt: str | None,
    out: str,
    data: str | None = None,
    rows: int = 64,
) -> dict[str, Any]:
    """Export the student directory ``model_dir`` as ``fmt`` to ``out``, checked on real
    rows; the summary of what was written and checked."""
    from kdplug.model_dir import load_classifier, read_config, student_path
    from kdplug.outputs import atomic_path

    fmt = pick_format(fmt, out)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    config = read_config(model_dir)
    x, rows_used = check_rows(model_dir, data, rows)
    image = x.dim() == 4
    size = tuple(config["input_size"][1:]) if image else None
    classifier = load_classifier(model_dir)
    deployable = Deployable(classifier, size).eval()
    carried = (student_path(model_dir) / "config.json").read_text(encoding="utf-8")
    with atomic_path(out) as tmp:
        with torch.no_grad():
            WRITERS[fmt](deployable, x[:2], tmp, carried)
        checks = check_export(fmt, tmp, classifier, x)
        worst = max(diff for _, diff in checks)
        if not worst <= TOLERANCE:  # NaN fails too
            raise UsageError(
                f"the {fmt} export of {model_dir} gives logits {worst:.3g} away from the "
                f"student's (more than {TOLERANCE:g}) on {rows_used}; nothing written; "
                "try another --format"
            )
    shape = ["batch", *x.shape[1:2], "height", "width"] if image else ["batch", *x.shape[1:]]
    return {
        "format": fmt,
        "file": str(out),
        "model": str(model_dir),
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32", "values": "[0, 1]"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(config["classes"])]},
        "classes": list(config["classes"]),
        "preprocessing_included": (
            {"resize_to": list(size), "mean": config["mean"], "std": config["std"]}
            if image
            else "the model's own"
        ),
        "rows_checked": len(x),
        "rows": rows_used,
        "checked_shapes": [shape for shape, _ in checks],
        "max_abs_diff": worst,
        "tolerance": TOLERANCE,
    }


def dynamic_shapes(x: torch.Tensor) -> dict[str, dict[int, Any]]:
    """Batch size dynamic, and an image's height and width."""
    from torch.export import Dim

    dims = {0: Dim("batch", min=1)}
    if x.dim() == 4:
        dims.update({2: Dim("height", min=2), 3: Dim("width", min=2)})
    return {"x": dims}


def write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, carried: str) -> None:
    """ONNX through torch.onnx's dynamo exporter (needs onnxscript), one file, the
    student's config.json as model metadata ``kdplug_config``."""
    import onnx

    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes(example),
            opset_version=ONNX_OPSET,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    except ImportError as exc:
        raise UsageError(
            f"--format onnx needs onnxscript and onnx ({exc}): pip install 'kdplug[onnx]'"
        ) from None
    program = onnx.load(str(path))
    onnx.helper.set_model_props(program, {"kdplug_config": carried})
    onnx.save(program, str(path))


def write_torchscript(
    model: torch.nn.Module, example: torch.Tensor, path: Path, carried: str
) -> None:
    """TorchScript by tracing, the student's config.json as an extra file. (The trace's
    warnings are about the student's shape tests, constant once the input is resized, and
    torch's deprecation of TorchScript, which the docs say.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={CONFIG_NAME: carried})


def write_export(model: torch.nn.Module, example: torch.Tensor, path: Path, carried: str) -> None:
    """A torch.export program (``torch.export.save``), the student's config.json as an
    extra file."""
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(example))
    torch.export.save(program, str(path), extra_files={CONFIG_NAME: carried})


WRITERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Path, str], None]] = {
    "onnx": write_onnx,
    "torchscript": write_torchscript,
    "export": write_export,
}


def runner(fmt: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported file at ``path``, loaded by the runtime that serves it."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError(
                "checking an ONNX export needs onnxruntime: pip install 'kdplug[onnx]'"
            ) from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation
            return torch.jit.load(str(path), map_location="cpu").eval()
    from kdplug.teacher_io import weights_only_loads

    with weights_only_loads():  # the file just written, yet never unpickled
        return torch.export.load(str(path)).module()


def check_inputs(x: torch.Tensor) -> list[torch.Tensor]:
    """The check's inputs: all rows, one row, and (images) the rows at another size."""
    inputs = [x, x[:1]]
    if x.dim() == 4:
        height, width = x.shape[-2:]
        inputs.append(F.interpolate(x[:3], size=(height + 5, width + 3), mode="bilinear"))
    return inputs


def check_export(
    fmt: str, path: Path, model: torch.nn.Module, x: torch.Tensor
) -> list[tuple[list[int], float]]:
    """Each input shape run through the exported file and through the student (``model``,
    as ``kdplug eval`` runs it), with the max abs difference of the logits."""
    run = runner(fmt, path)
    checks = []
    with torch.no_grad():
        for inputs in check_inputs(x):
            got, expected = run(inputs.contiguous()), model(inputs)
            if got.shape != expected.shape:
                raise UsageError(
                    f"the {fmt} export gives logits of shape {list(got.shape)} for input "
                    f"{list(inputs.shape)}, the student {list(expected.shape)}; nothing written"
                )
            checks.append((list(inputs.shape), (got - expected).abs().max().item()))
    return checks
