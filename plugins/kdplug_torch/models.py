"""TorchScript and torch.export model teachers: load the file, adapt inputs, return logits."""

from __future__ import annotations

import contextlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from kdplug import UsageError
from kdplug.outputs import file_hash
from kdplug.preprocess import Preprocess
from kdplug.teacher_io import (
    class_names,
    existing_file,
    pickle_allowed,
    preprocess,
    probs_to_logits,
    refuse_pickle,
    weights_only_loads,
)

# file names torch.export.save gives objects that torch.export.load unpickles
# (torch.export.pt2_archive.constants CUSTOM_OBJ_ / OPAQUE_OBJ_FILENAME_PREFIX)
PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


class ModelTeacher(torch.nn.Module):
    """``teacher(x [B, C, H, W] in [0, 1]) -> logits [B, K]`` for a loaded torch model.

    ``probs`` marks a model ending in softmax: its outputs become ``log p`` (zeros as
    IMPOSSIBLE). ``fixed_mode`` leaves the model's train/eval mode alone (torch.export
    programs are frozen in the mode they were exported in).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Preprocess,
        classes: list[str] | None,
        probs: bool,
        fingerprint: str,
        source: str,
        fixed_mode: bool,
    ):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.classes = classes
        self.probs = probs
        self.fingerprint = fingerprint
        self.source = source
        self.fixed_mode = fixed_mode

    def train(self, mode: bool = True) -> ModelTeacher:
        self.training = mode
        self.preprocess.train(mode)
        if not self.fixed_mode:
            self.model.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(self.preprocess(x))
        if isinstance(out, tuple | list) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise UsageError(f"{self.source} returned {type(out).__name__}, not a logits tensor")
        return probs_to_logits(out) if self.probs else out


def _teacher(
    model: torch.nn.Module, source: str, path: Any, fixed_mode: bool, **options: Any
) -> ModelTeacher:
    """Wrap ``model`` with its preprocessing and the options of the spec."""
    mean, std, size, in_chans = (options[k] for k in ("mean", "std", "size", "in_chans"))
    classes, probs = options["classes"], options["probs"]
    if not isinstance(probs, bool):
        raise UsageError(f"{source}: option probs must be true or false, got {probs!r}")
    return ModelTeacher(
        model,
        preprocess(source, size, mean, std, in_chans),
        class_names(classes, source),
        probs,
        file_hash(path),
        source,
        fixed_mode,
    ).eval()


def load_torchscript(ref, mean, std, size, in_chans, classes, probs) -> ModelTeacher:
    """A TorchScript archive loaded on the CPU (move it with ``.to(device)``)."""
    source = f"torchscript:{ref}"
    path = existing_file(ref, "torchscript")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError for a bad archive
        raise UsageError(
            f"{source}: cannot load {path} as TorchScript (corrupt, truncated or not a "
            f"torch.jit.save file): {_first_line(exc)}"
        ) from None
    return _teacher(
        model,
        source,
        path,
        False,
        mean=mean,
        std=std,
        size=size,
        in_chans=in_chans,
        classes=classes,
        probs=probs,
    )


def load_exported(ref, mean, std, size, in_chans, classes, probs, allow_pickle) -> ModelTeacher:
    """A torch.export program; channels and size default to its input's static shape.

    ``torch.export.load`` falls back to pickle for objects it cannot load safely; without
    the pickle opt-in every load inside it is forced to ``weights_only`` and programs that
    store pickled Python objects are refused.
    """
    source = f"export:{ref}"
    path = existing_file(ref, "export")
    program = _load_program(path, source, pickle_allowed(allow_pickle))
    shape = _input_shape(program)
    if shape is not None and len(shape) == 4:
        if in_chans is None and isinstance(shape[1], int):
            in_chans = shape[1]
        if size is None and all(isinstance(s, int) for s in shape[2:]):
            size = list(shape[2:])
    return _teacher(
        program.module(),
        source,
        path,
        True,
        mean=mean,
        std=std,
        size=size,
        in_chans=in_chans,
        classes=classes,
        probs=probs,
    )


def _load_program(path: Path, source: str, trusted: bool) -> Any:
    if trusted:
        guard = contextlib.nullcontext()
    else:
        if _pickled_objects(path):
            raise refuse_pickle(
                source, path, "a program without custom objects", "stores objects only pickle loads"
            )
        guard = weights_only_loads()
    try:
        with guard:
            return torch.export.load(str(path))
    except pickle.UnpicklingError:
        raise refuse_pickle(
            source, path, "a torch.export.save program", "holds data that only pickle can load"
        ) from None
    except Exception as exc:
        raise UsageError(
            f"{source}: cannot load {path} as a torch.export program (corrupt, truncated or "
            f"not a torch.export.save .pt2 file): {_first_line(exc)}"
        ) from None


def _pickled_objects(path: Path) -> bool:
    """Whether the .pt2 archive holds custom or opaque Python objects (loaded by pickle)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n.rsplit("/", 1)[-1] for n in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return False  # not an archive at all: torch.export.load says so below
    return any(name.startswith(PICKLED_PREFIXES) for name in names)


def _input_shape(program: Any) -> list[int | None] | None:
    """The first user input's shape, ints where static and None where symbolic."""
    inputs = program.graph_signature.user_inputs
    for node in program.graph.nodes:
        if node.op == "placeholder" and inputs and node.name == inputs[0]:
            value = node.meta.get("val")
            if value is None or not hasattr(value, "shape"):
                return None
            return [s if isinstance(s, int) else None for s in value.shape]
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
