"""The student model directory, in timm's hub format: a plain model that needs no kdplug.

``DIR/config.json`` is what ``timm.models.save_for_hf`` / ``push_to_hub`` write:
``architecture``, ``num_classes``, ``label_names`` (the classes), ``model_args`` (the
keyword arguments that rebuild the model: ``num_classes``, ``in_chans``, ...) and
``pretrained_cfg`` (``input_size`` ``[C, H, W]``, ``mean``, ``std``, ``num_classes``,
``interpolation`` ``bilinear``, ``crop_pct`` 1.0, ``crop_mode`` ``squash``, and the model's
``first_conv`` / ``classifier``), with kdplug's own fields (``kdplug_version``) beside them.
``DIR/model.safetensors`` holds the state dict. So ``timm.create_model("local-dir:DIR",
pretrained=True)`` builds the model with its weights. Inference: resize ``[0, 1]`` images to
``input_size``, then ``(x - mean) / std``, then the model.

A tabular student (``data_kind`` ``tabular``, e.g. ``tabular:mlp``) has ``input_size``
``[D]`` (its feature count) and no image ``mean``/``std`` (it normalizes its features
itself); kdplug's field ``student`` names the students-registry component that rebuilds it
from ``architecture`` and ``model_args``, as it does for any student that is not timm's.

Older student directories (a flat ``config.json``: ``architecture``, ``num_classes``,
``in_chans``, ``classes``, ``input_size``, ``mean``, ``std``) are still read; ``read_config``
returns one normalized dict for both. ``distill`` writes this format, ``eval`` reads it, and
so does the timm plugin's ``kdplug:`` teacher (through kdplug.api).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdplug.errors import UsageError
from kdplug.outputs import atomic_path
from kdplug.preprocess import Preprocess

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# what read_config returns for every student directory, whatever its format
REQUIRED = ("architecture", "num_classes", "in_chans", "classes", "input_size", "mean", "std")
# how kdplug prepares a student's inputs, in timm's pretrained_cfg terms: the whole image
# resized (bilinear, antialiased) to input_size, no crop
INPUT_RECIPE = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}
# facts about the network timm keeps in pretrained_cfg (adapting the stem or the head)
MODEL_FACTS = ("first_conv", "classifier", "fixed_input_size")


def hub_config(
    model: torch.nn.Module,
    *,
    architecture: str,
    classes: list[str],
    input_size: list[int],
    mean: list[float] | None,
    std: list[float] | None,
    model_args: Mapping[str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a student directory: timm's hub config for ``model`` (rebuilt
    by ``timm.create_model(architecture, **model_args)``; ``model_args``: the keyword
    arguments beyond ``num_classes`` and ``in_chans``), with kdplug's own keys ``fields``
    beside timm's (timm ignores them)."""
    from kdplug import __version__

    num_classes = len(classes)
    in_chans = int(input_size[0])
    own_cfg = getattr(model, "pretrained_cfg", {}) or {}
    pretrained_cfg = {k: own_cfg[k] for k in MODEL_FACTS if own_cfg.get(k) is not None}
    recipe = {}  # feature rows (mean None): the model normalizes them itself
    if mean is not None and std is not None:
        recipe = {**INPUT_RECIPE, "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    pretrained_cfg.update(
        input_size=[int(s) for s in input_size], **recipe, num_classes=num_classes
    )
    return {
        "architecture": architecture,
        "num_classes": num_classes,
        "label_names": [str(c) for c in classes],
        "model_args": {"num_classes": num_classes, "in_chans": in_chans, **(model_args or {})},
        "pretrained_cfg": pretrained_cfg,
        "kdplug_version": __version__,
        **(fields or {}),
    }


def save_student(path: str | os.PathLike, model: torch.nn.Module, **options: Any) -> None:
    """Write ``model``'s weights and its config, ``hub_config(model, **options)``, as a
    student directory, atomically (whole dir)."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    config = hub_config(model, **options)
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
    """The validated ``config.json`` of the student directory at ``path``, normalized: the
    file's keys plus ``REQUIRED`` and ``model_args``, for the hub format and the older flat
    one alike."""
    file = student_path(path) / CONFIG
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{file.parent} is not a student directory (no {CONFIG})") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file} is not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{file} lacks {', '.join(REQUIRED)}")
    config = from_hub(file, raw) if "pretrained_cfg" in raw else from_flat(file, raw)
    dims, shape = (1, "[D]") if is_tabular(config) else (3, "[C, H, W]")
    if len(config["classes"]) != config["num_classes"] or len(config["input_size"]) != dims:
        raise UsageError(f"{file}: classes/num_classes or input_size {shape} disagree")
    for key in ("mean", "std") if not is_tabular(config) else ():
        check_normalization(file, key, config[key], config["in_chans"])
    return config


def is_tabular(config: Mapping[str, Any]) -> bool:
    """Whether the student of ``config`` reads feature rows ``[B, D]`` (not images)."""
    return config.get("data_kind") == "tabular"


def from_flat(file: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """An older student directory's flat config, normalized."""
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise UsageError(f"{file} lacks {', '.join(missing)}")
    model_args = {"num_classes": raw["num_classes"], "in_chans": raw["in_chans"]}
    return {**raw, "model_args": model_args}


def from_hub(file: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """A hub-format config (kdplug's or timm's own, label names at the top level or in
    ``pretrained_cfg`` as timm reads them), normalized."""
    cfg = raw["pretrained_cfg"] if isinstance(raw["pretrained_cfg"], dict) else {}
    model_args = raw.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise UsageError(f"{file}: model_args must be an object, got {json.dumps(model_args)}")
    labels = raw.get("label_names", cfg.get("label_names"))
    wanted = {
        "architecture": raw.get("architecture"),
        "num_classes": raw.get("num_classes", cfg.get("num_classes")),
        "label_names": labels,
        "pretrained_cfg.input_size": cfg.get("input_size"),
        "pretrained_cfg.mean": cfg.get("mean"),
        "pretrained_cfg.std": cfg.get("std"),
    }
    if is_tabular(raw):  # feature rows: the model normalizes them itself
        del wanted["pretrained_cfg.mean"], wanted["pretrained_cfg.std"]
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise UsageError(f"{file} lacks {', '.join(missing)}")
    if isinstance(labels, dict) and all(str(k).isdigit() for k in labels):
        labels = [labels[k] for k in sorted(labels, key=int)]  # timm's {class index: name}
    input_size = cfg["input_size"]
    if not isinstance(input_size, list) or not isinstance(labels, list):
        raise UsageError(f"{file}: classes/num_classes or input_size [C, H, W] disagree")
    in_chans = model_args.get("in_chans", input_size[0] if input_size else None)
    num_classes = wanted["num_classes"]
    return {
        **raw,
        "architecture": raw["architecture"],
        "num_classes": num_classes,
        "in_chans": in_chans,
        "classes": [str(c) for c in labels],
        "input_size": input_size,
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
        "model_args": {**model_args, "num_classes": num_classes, "in_chans": in_chans},
    }


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
    """The timm model (eval mode, CPU) and normalized config of the student directory at
    ``path``: ``timm.create_model(architecture, **model_args)`` with its weights."""
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = student_path(path)
    config = read_config(path)
    student = config.get("student", "timm")
    builder = "timm" if student == "timm" else f"student {student!r}"
    try:
        if student == "timm":
            model = timm.create_model(
                config["architecture"], pretrained=False, **config["model_args"]
            )
        else:
            model = registry_student(student, config)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(
            f"{path}: {builder} cannot build {config['architecture']!r} ({exc})"
        ) from None
    weights = path / WEIGHTS
    try:
        model.load_state_dict(load_file(str(weights)))
    except FileNotFoundError:
        raise UsageError(f"{path} has no {WEIGHTS}") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0]
        raise UsageError(f"{weights} is corrupt or does not fit the config: {reason}") from None
    return model.eval(), config


def registry_student(student: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """A student that is not timm's, rebuilt by the students-registry component ``student``
    (its plugin) from ``architecture`` and ``model_args``, as ``distill`` built it."""
    from kdplug.plugins import create
    from kdplug.spec import Spec

    args = dict(config["model_args"])
    num_classes, in_chans = args.pop("num_classes"), args.pop("in_chans")
    spec = Spec.of(student, config["architecture"], **args)
    return create("students", spec, num_classes, in_chans)


def student_preprocess(config: dict[str, Any]) -> Preprocess:
    """The student's input recipe from its ``config``: resize to ``input_size``, then
    ``(x - mean) / std``; none for feature rows (a tabular student normalizes them)."""
    if is_tabular(config):
        return Preprocess()  # [B, D] rows pass through
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
