"""Building timm students and teachers, and loading their weights safely.

Weights come from safetensors or from a torch state dict loaded with ``weights_only=True``
(timm's own ``load_state_dict``), or from a kdplug student directory's model.safetensors.
The ``kdplug:`` teacher is a student directory (kdplug's format, read through kdplug.api)
run as ``ModelTeacher``, as ``timm:`` teachers are.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import torch

from kdplug.api import (
    STUDENT_CONFIG,
    STUDENT_WEIGHTS,
    Preprocess,
    UsageError,
    file_hash,
    load_student,
    read_student_config,
    student_path,
    student_preprocess,
)


def check_architecture(arch: str) -> None:
    """Refuse a name timm does not know, suggesting the closest one."""
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see timm.list_models())"
        raise UsageError(f"timm has no architecture {arch!r}{hint}")


def create(arch: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(arch, **kwargs)``; an unknown name or unreachable weights is a
    UsageError."""
    import timm

    check_architecture(arch)
    try:
        return timm.create_model(arch, **kwargs)
    except Exception as exc:
        if kwargs.get("pretrained"):
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(
                f"timm:{arch}: pretrained weights could not be loaded ({reason})"
            ) from None
        raise


def weights_file(path: str) -> Path:
    """The weights file at ``path`` (a student directory means its model.safetensors)."""
    file = Path(path).expanduser()
    if file.is_dir() and (file / "student" / STUDENT_WEIGHTS).exists():
        file = file / "student"
    if file.is_dir():
        file = file / STUDENT_WEIGHTS
    if not file.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    return file


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch checkpoint (``weights_only=True``)."""
    from timm.models import load_state_dict

    file = weights_file(path)
    try:
        state = load_state_dict(str(file), use_ema=True, weights_only=True)
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise UsageError(
            f"checkpoint {file} is corrupt, truncated or not a weights file "
            f"({type(exc).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"checkpoint {file} does not hold a state dict of tensors")
    return state


def _heads(model: torch.nn.Module) -> tuple[str, ...]:
    head = model.pretrained_cfg.get("classifier") or ()
    return (head,) if isinstance(head, str) else tuple(head)


def apply_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], file: str, new_head: bool = False
) -> None:
    """Load ``state`` into ``model``; with ``new_head``, classifier weights of another shape
    are left out (fine-tuning a checkpoint to another class count)."""
    own = model.state_dict()
    skipped = set()
    if new_head:
        heads = tuple(f"{h}." for h in _heads(model))
        skipped = {
            k
            for k, v in state.items()
            if k.startswith(heads) and k in own and own[k].shape != v.shape
        }
        state = {k: v for k, v in state.items() if k not in skipped}
    try:
        result = model.load_state_dict(state, strict=not skipped)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UsageError(f"checkpoint {file} does not fit this model: {reason}") from None
    if skipped and (set(result.missing_keys) - skipped or result.unexpected_keys):
        raise UsageError(
            f"checkpoint {file} does not fit this model (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


def channel_values(values: Any, in_chans: int, what: str) -> list[float]:
    """Per-channel ``mean``/``std`` for ``in_chans`` channels (one value is repeated; a
    3-channel value is averaged for a 1-channel model)."""
    values = [values] if isinstance(values, int | float) else list(values)
    if not values or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise UsageError(f"timm: {what} must be numbers, got {values!r}")
    if len(values) == in_chans:
        return [float(v) for v in values]
    if len(values) == 1:
        return [float(values[0])] * in_chans
    if in_chans == 1:
        return [sum(values) / len(values)]
    raise UsageError(f"timm: {what} has {len(values)} values but the model has {in_chans} channels")


def _rate(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise UsageError(f"timm: {name} must be in [0, 1), got {value}")
    return value


def build_student(
    arch: str,
    num_classes: int,
    in_chans: int,
    *,
    drop_path_rate: float,
    drop_rate: float,
    pretrained: bool,
    checkpoint: str | None,
    mean: Any,
    std: Any,
) -> torch.nn.Module:
    """A timm model; ``model.input_normalization`` is its ``(mean, std)`` when known (given,
    from a student directory checkpoint, or the pretrained weights'), else None."""
    kwargs: dict[str, Any] = {}
    if _rate("drop_path_rate", drop_path_rate):
        kwargs["drop_path_rate"] = drop_path_rate
    if _rate("drop_rate", drop_rate):
        kwargs["drop_rate"] = drop_rate
    if (mean is None) != (std is None):
        raise UsageError("timm: give both mean and std, or neither")
    model = create(
        arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
    )
    normalization = None
    if checkpoint is not None:
        file = weights_file(str(checkpoint))
        apply_weights(model, load_weights(str(file)), str(file), new_head=True)
        if (file.parent / STUDENT_CONFIG).exists():
            config = read_student_config(file.parent)
            normalization = (config["mean"], config["std"])
    elif pretrained:
        normalization = (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    if mean is not None:
        normalization = (mean, std)
    if normalization is not None:
        normalization = tuple(
            channel_values(v, in_chans, what) for v, what in zip(normalization, ("mean", "std"))
        )
        if min(normalization[1]) <= 0:
            raise UsageError(f"timm: std must be positive, got {normalization[1]}")
    model.input_normalization = normalization
    return model


class ModelTeacher(torch.nn.Module):
    """A model on ``[0, 1]`` images: ``preprocess`` then ``model`` -> logits ``[B, C]``.

    Attributes ``classes`` (names in output order, or None) and ``fingerprint`` (a hash of
    the files it came from): the ``timm:`` and ``kdplug:`` teachers.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Preprocess,
        classes: list[str] | None,
        fingerprint: str,
    ):
        super().__init__()
        self.model = model.eval()
        self.preprocess = preprocess
        self.classes = classes
        self.fingerprint = fingerprint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


def _inferred(arch: str, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """num_classes and in_chans read off a checkpoint's classifier and first conv."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    found: dict[str, int] = {}
    if cfg is None:
        return found
    head = cfg.classifier if isinstance(cfg.classifier, str) else (cfg.classifier or [None])[0]
    if head and f"{head}.weight" in state:
        found["num_classes"] = int(state[f"{head}.weight"].shape[0])
    conv = state.get(f"{cfg.first_conv}.weight") if cfg.first_conv else None
    if conv is not None and conv.dim() == 4:
        found["in_chans"] = int(conv.shape[1])
    return found


def build_teacher(
    arch: str,
    *,
    checkpoint: str | None,
    num_classes: int | None,
    in_chans: int | None,
    pretrained: bool,
    classes: Any,
    mean: Any,
    std: Any,
    size: Any,
) -> ModelTeacher:
    """A timm teacher; class count and channels default to the checkpoint's, preprocessing
    to the model's pretrained_cfg (input size, mean, std) unless given."""
    check_architecture(arch)
    if checkpoint is None and not pretrained:
        raise UsageError(f"timm:{arch} teacher needs checkpoint=PATH or pretrained=true")
    if classes is not None:
        classes = [str(c) for c in (classes if isinstance(classes, list) else [classes])]
    state = load_weights(str(checkpoint)) if checkpoint is not None else None
    inferred = _inferred(arch, state) if state is not None else {}
    num_classes = num_classes or (len(classes) if classes else inferred.get("num_classes"))
    in_chans = in_chans or inferred.get("in_chans") or 3
    if classes and num_classes != len(classes):
        raise UsageError(f"timm:{arch}: {len(classes)} classes named but num_classes={num_classes}")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = create(arch, pretrained=pretrained and state is None, in_chans=in_chans, **kwargs)
    if state is not None:
        apply_weights(model, state, str(checkpoint))
    cfg = model.pretrained_cfg
    preprocess = Preprocess(
        size=size if size is not None else cfg.get("input_size"),
        mean=channel_values(cfg.get("mean", 0.0) if mean is None else mean, in_chans, "mean"),
        std=channel_values(cfg.get("std", 1.0) if std is None else std, in_chans, "std"),
        in_chans=in_chans,
    )
    if checkpoint is not None:
        fingerprint = file_hash(weights_file(str(checkpoint)))
    else:
        fingerprint = f"timm:{arch}:{cfg.get('tag') or 'default'}"
    return ModelTeacher(model, preprocess, classes, fingerprint)


def load_student_teacher(path: str) -> ModelTeacher:
    """The ``kdplug:`` teacher: the student directory at ``path`` (or ``path/student``) with
    its own resize and normalization, fingerprinted by its files."""
    model, config = load_student(path)
    fingerprint = file_hash(student_path(path))
    return ModelTeacher(model, student_preprocess(config), list(config["classes"]), fingerprint)
