"""Building timm students and teachers, and loading their weights safely.

Weights come from safetensors or from a torch state dict loaded with ``weights_only=True``
(timm's own ``load_state_dict``), or from a kdplug student directory's model.safetensors.
The ``kdplug:`` teacher is a student directory (kdplug's format, read through kdplug.api)
run as ``ModelTeacher``, as ``timm:`` teachers are.
"""

from __future__ import annotations

import difflib
import json
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
    model_intermediates,
    read_student_config,
    student_path,
    student_preprocess,
)

DATA = "data"  # a preprocessing setting nothing gave: the engine takes it from the data
METADATA_HELP = 'e.g. input_size "[1, 28, 28]", mean "[0.13]", classes "[0, 1]"'


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
        if is_student_directory(file.parent):
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

    Attributes ``classes`` (names in output order, or None), ``fingerprint`` (a hash of
    the files it came from) and ``inputs`` (what ``preprocess`` feeds the model, and where
    each setting came from): the ``timm:`` and ``kdplug:`` teachers. ``sources`` says where
    ``size``, ``mean`` and ``std`` came from; ``DATA`` marks those that nothing gave, which
    ``normalize_like_data`` then takes from the data (mean and std; a size nothing gave is
    the data's own: no resize). ``sources`` None: a model of feature rows ``[B, D]`` (a
    tabular student), fed them as they are (``inputs`` None). ``intermediates`` (the
    contract's) is set for a model with timm's ``forward_intermediates``, else None.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Preprocess,
        classes: list[str] | None,
        fingerprint: str,
        sources: dict[str, str] | None,
    ):
        super().__init__()
        self.model = model.eval()
        self.preprocess = preprocess
        self.classes = classes
        self.fingerprint = fingerprint
        has_stages = callable(getattr(model, "forward_intermediates", None))
        self.intermediates = self._intermediates if has_stages else None
        if sources is None:  # feature rows: nothing to resize or normalize here
            self.inputs, self.normalize_like_data = None, None
            return
        size = preprocess.size
        self.inputs = {
            "size": list(size) if size is not None else None,
            "mean": None if sources["mean"] == DATA else _values(preprocess.mean),
            "std": None if sources["std"] == DATA else _values(preprocess.std),
            "in_chans": preprocess.in_chans,
            "from": dict(sources),
        }
        wants_data = DATA in (sources["mean"], sources["std"])
        self.normalize_like_data = self._normalize_like_data if wants_data else None

    def _normalize_like_data(self, mean: list[float], std: list[float], where: str) -> None:
        """Take the mean and std that nothing else gave from the data (``where`` says how
        they were measured)."""
        channels = self.preprocess.in_chans
        for key, values in (("mean", mean), ("std", std)):
            if self.inputs["from"][key] != DATA:
                continue
            values = channel_values(values, channels, key)
            old = getattr(self.preprocess, key)
            setattr(self.preprocess, key, torch.tensor(values).view(1, -1, 1, 1).to(old))
            self.inputs[key] = [round(v, 6) for v in values]
            self.inputs["from"][key] = where
        self.normalize_like_data = None

    def model_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as its model takes it (``preprocess``); refused while the mean or std that
        ``normalize_like_data`` takes from the data is not known."""
        if self.normalize_like_data is not None:
            unknown = [k for k in ("mean", "std") if self.inputs["from"][k] == DATA]
            raise UsageError(
                f"this teacher's {' and '.join(unknown)} are not known (its checkpoint "
                "carries none): give them as options (mean=, std=), or run it through "
                "kdplug.teachers.TeacherSet with data=, which measures them on the data"
            )
        return self.preprocess(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.model_inputs(x))

    def _intermediates(
        self, x: torch.Tensor, stages: list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``intermediates`` of a model with timm's ``forward_intermediates``: the logits of
        ``forward`` and the features ``[B, C_i, H_i, W_i]`` at ``stages``, in one forward."""
        arch = self.model.pretrained_cfg.get("architecture") or type(self.model).__name__
        owner = f"the teacher's model {arch}"
        return model_intermediates(self.model, self.model_inputs(x), stages, owner)


def _values(buffer: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in buffer.flatten()]


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
    as ``preprocessing`` chooses it."""
    check_architecture(arch)
    if checkpoint is None and not pretrained:
        raise UsageError(f"timm:{arch} teacher needs checkpoint=PATH or pretrained=true")
    if classes is not None:
        classes = [str(c) for c in (classes if isinstance(classes, list) else [classes])]
    file = weights_file(str(checkpoint)) if checkpoint is not None else None
    state = load_weights(str(file)) if file is not None else None
    carried, carried_from = carried_inputs(file) if file is not None else ({}, "")
    classes = classes or carried.get("classes")
    inferred = _inferred(arch, state) if state is not None else {}
    num_classes = num_classes or (len(classes) if classes else inferred.get("num_classes"))
    in_chans = in_chans or inferred.get("in_chans") or 3
    if classes and num_classes != len(classes):
        raise UsageError(f"timm:{arch}: {len(classes)} classes named but num_classes={num_classes}")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = create(arch, pretrained=pretrained and state is None, in_chans=in_chans, **kwargs)
    if state is not None:
        apply_weights(model, state, str(file))
    given = {"size": size, "mean": mean, "std": std}
    values, sources = preprocessing(arch, given, carried, carried_from, pretrained)
    preprocess = Preprocess(
        size=values["size"],
        mean=channel_values(values["mean"], in_chans, "mean"),
        std=channel_values(values["std"], in_chans, "std"),
        in_chans=in_chans,
    )
    if file is not None:
        fingerprint = file_hash(file)
    else:
        fingerprint = f"timm:{arch}:{model.pretrained_cfg.get('tag') or 'default'}"
    return ModelTeacher(model, preprocess, classes, fingerprint, sources)


def preprocessing(
    arch: str, given: dict[str, Any], carried: dict[str, Any], carried_from: str, pretrained: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """``size``, ``mean`` and ``std`` of a timm teacher, and where each came from: the
    spec's option, else what the checkpoint carries, else (``pretrained=true`` only) timm's
    ``pretrained_cfg`` for the architecture, else the data (``DATA``: the data's own size,
    and the mean and std the engine measures on it)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None and pretrained else {}
    unknown = {"size": None, "mean": 0.0, "std": 1.0}  # until the engine gives the data's
    values, sources = {}, {}
    for key, cfg_key in (("size", "input_size"), ("mean", "mean"), ("std", "std")):
        candidates = (
            (given[key], f"option {key}="),
            (carried.get(cfg_key), carried_from),
            (cfg.get(cfg_key), f"timm's pretrained_cfg for {arch}"),
        )
        found = [(value, source) for value, source in candidates if value is not None]
        values[key], sources[key] = found[0] if found else (unknown[key], DATA)
    return values, sources


def carried_inputs(file: Path) -> tuple[dict[str, Any], str]:
    """What a checkpoint says about its inputs and classes (``input_size``, ``mean``,
    ``std``, ``classes``), and where it says it: the config.json of the student directory
    it is in, else its safetensors metadata (each value JSON). Empty when it says nothing."""
    if is_student_directory(file.parent):
        config = read_student_config(file.parent)
        found = {k: config[k] for k in ("input_size", "mean", "std", "classes")}
        return found, f"the student directory {file.parent}"
    if file.suffix != ".safetensors":
        return {}, ""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    found = {}
    for key in ("input_size", "mean", "std", "classes"):
        if key in metadata:
            try:
                found[key] = json.loads(metadata[key])
            except ValueError:
                found[key] = None
            if key == "classes" and not isinstance(found[key], list):
                found[key] = None
            if found[key] is None:
                raise UsageError(
                    f"checkpoint {file}: metadata {key!r} must be JSON ({METADATA_HELP}), "
                    f"got {metadata[key][:80]!r}"
                )
    if "classes" in found:
        found["classes"] = [str(c) for c in found["classes"]]
    return found, f"the metadata of {file.name}"


def is_student_directory(path: Path) -> bool:
    """A directory with a config.json kdplug wrote (``kdplug_version``, or the older flat
    format), not timm's own, whose ``pretrained_cfg`` may hold the architecture's defaults
    rather than the checkpoint's: a student directory."""
    file = path / STUDENT_CONFIG
    if not file.is_file():
        return False
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # read_student_config names the problem
    return (
        not isinstance(config, dict) or "kdplug_version" in config or "pretrained_cfg" not in config
    )


def load_student_teacher(path: str) -> ModelTeacher:
    """The ``kdplug:`` teacher: the student directory at ``path`` (or ``path/student``) with
    its own resize and normalization, fingerprinted by its files."""
    model, config = load_student(path)
    directory = student_path(path)
    where = f"the student directory {directory}"
    images = config.get("data_kind", "image") == "image"
    return ModelTeacher(
        model,
        student_preprocess(config),
        list(config["classes"]),
        file_hash(directory),
        dict.fromkeys(("size", "mean", "std"), where) if images else None,
    )
