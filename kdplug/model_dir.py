"""The student model directory: a plain timm model that needs no kdplug to use.

``DIR/config.json`` holds ``architecture``, ``num_classes``, ``in_chans``, ``classes``,
``input_size`` ``[C, H, W]``, ``mean`` and ``std``; ``DIR/model.safetensors`` holds the state
dict of ``timm.create_model(architecture, num_classes=..., in_chans=...)``. Inference: resize
``[0, 1]`` images to ``input_size``, then ``(x - mean) / std``, then the model.

Students are timm models and this is kdplug's format for them: ``distill`` writes it,
``eval`` reads it, and so does the timm plugin's ``kdplug:`` teacher (through kdplug.api).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from kdplug.errors import UsageError
from kdplug.outputs import atomic_path
from kdplug.preprocess import Preprocess

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
REQUIRED = ("architecture", "num_classes", "in_chans", "classes", "input_size", "mean", "std")


def save_student(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    architecture: str,
    classes: list[str],
    input_size: list[int],
    mean: list[float],
    std: list[float],
) -> None:
    """Write ``model``'s weights and config as a student directory, atomically (whole dir)."""
    from safetensors.torch import save

    from kdplug import __version__

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    config = {
        "architecture": architecture,
        "num_classes": len(classes),
        "in_chans": int(input_size[0]),
        "classes": list(classes),
        "input_size": [int(s) for s in input_size],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "kdplug_version": __version__,
    }
    with atomic_path(path, directory=True) as tmp:
        # bytes written by Python, so a full disk raises OSError (atomic_path names it)
        (tmp / WEIGHTS).write_bytes(save(state))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def student_path(path: str | os.PathLike) -> Path:
    """The student directory at ``path``, or at ``path/student`` for a distill run directory."""
    path = Path(path)
    if not (path / CONFIG).exists() and (path / "student" / CONFIG).exists():
        path = path / "student"
    if not path.is_dir():
        raise UsageError(f"no such student directory: {path}")
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``config.json`` of the student directory at ``path``."""
    file = student_path(path) / CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{file.parent} is not a student directory (no {CONFIG})") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file} is not readable JSON ({exc})") from None
    missing = [k for k in REQUIRED if not isinstance(config, dict) or k not in config]
    if missing:
        raise UsageError(f"{file} lacks {', '.join(missing)}")
    if len(config["classes"]) != config["num_classes"] or len(config["input_size"]) != 3:
        raise UsageError(f"{file}: classes/num_classes or input_size [C, H, W] disagree")
    for key in ("mean", "std"):
        check_normalization(file, key, config[key], config["in_chans"])
    return config


def check_normalization(file: Path, key: str, values: Any, channels: Any) -> None:
    """``mean`` / ``std``: one finite number per channel (or one for all); std > 0."""
    values = values if isinstance(values, list) else [values]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if (
        not numbers
        or not all(math.isfinite(v) for v in values)
        or len(values) not in (1, channels)
        or (key == "std" and min(values) <= 0)
    ):
        bound = " > 0" if key == "std" else ""
        raise UsageError(
            f"{file}: {key} must be a finite number{bound} per channel (in_chans is "
            f"{channels}) or one for all, got {json.dumps(values)}"
        )


def load_student(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The timm model (eval mode, CPU) and config of the student directory at ``path``."""
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = student_path(path)
    config = read_config(path)
    try:
        model = timm.create_model(
            config["architecture"],
            pretrained=False,
            num_classes=config["num_classes"],
            in_chans=config["in_chans"],
        )
    except RuntimeError as exc:
        raise UsageError(f"{path}: timm cannot build {config['architecture']!r} ({exc})") from None
    weights = path / WEIGHTS
    try:
        model.load_state_dict(load_file(str(weights)))
    except FileNotFoundError:
        raise UsageError(f"{path} has no {WEIGHTS}") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0]
        raise UsageError(f"{weights} is corrupt or does not fit the config: {reason}") from None
    return model.eval(), config


def student_preprocess(config: dict[str, Any]) -> Preprocess:
    """The student's input recipe from its ``config``: resize to ``input_size``, then
    ``(x - mean) / std``."""
    return Preprocess(
        size=config["input_size"],
        mean=config["mean"],
        std=config["std"],
        in_chans=config["in_chans"],
    )


def load_classifier(path: str | os.PathLike) -> torch.nn.Sequential:
    """The student directory at ``path`` as one model on ``[0, 1]`` images, as ``kdplug eval``
    runs it: its own resize and normalization, then the network; ``classes`` are its names.

    (The ``kdplug:`` teacher, the same directory as a teacher, is the timm plugin's.)
    """
    model, config = load_student(path)
    classifier = torch.nn.Sequential(student_preprocess(config), model).eval()
    classifier.classes = list(config["classes"])
    return classifier
