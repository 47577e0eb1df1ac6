"""TorchScript and torch.export model teachers: load the file, adapt inputs, return logits.

Moving such a teacher to a device re-places the program rather than its parameters alone:
a TorchScript archive is loaded again with ``map_location`` (its constants and tensor
attributes, which ``.to()`` leaves behind), a torch.export program goes through
``move_to_device_pass`` (its lifted constants and the devices its factory calls were
traced with).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdplug.api import (
    Preprocess,
    UsageError,
    class_names,
    code_allowed,
    describe,
    existing_file,
    file_hash,
    fixed_batch,
    pickle_allowed,
    preprocess,
    probs_to_logits,
    refuse_code,
    refuse_pickle,
    run_in_batches,
    shape_defaults,
    spec_inputs,
    weights_only_loads,
)
from kdplug_torch.program_check import RULE, archive_findings, refused_calls

TORCHSCRIPT_RISK = (
    "is a TorchScript program: loading it runs its __setstate__ code and running it runs "
    "its forward, which can read and write any file"
)


class ModelTeacher(torch.nn.Module):
    """``teacher(x [B, C, H, W] in [0, 1]) -> logits [B, K]`` for a loaded torch model.

    ``probs`` marks a model ending in softmax: its outputs become ``log p`` (zeros as
    IMPOSSIBLE). ``fixed_mode`` leaves the model's train/eval mode alone (torch.export
    programs are frozen in the mode they were exported in). ``batch`` is the one batch size
    a program was saved for (None: any); other batches are run in chunks of it. ``place``
    builds the model on a device; ``to(device)`` calls it.
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
        batch: int | None = None,
        place: Callable[[torch.device], torch.nn.Module] | None = None,
    ):
        super().__init__()
        self.model = model
        self.place = place
        self.device = torch.device("cpu")
        self.preprocess = preprocess
        self.classes = classes
        self.probs = probs
        self.fingerprint = fingerprint
        self.source = source
        self.fixed_mode = fixed_mode
        self.batch = batch

    def to(self, *args: Any, **kwargs: Any) -> ModelTeacher:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is None or self.place is None:
            return super().to(*args, **kwargs)
        if device != self.device:
            self.model, self.device = self.place(device), device
            self.train(self.training)
        self.preprocess.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> ModelTeacher:
        self.training = mode
        self.preprocess.train(mode)
        if not self.fixed_mode:
            self.model.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = run_in_batches(self._run, self.preprocess(x), self.batch)
        return probs_to_logits(out) if self.probs else out

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.model(x)
        except RuntimeError as exc:
            if x.device.type == "cpu" or "device" not in str(exc):
                raise
            raise UsageError(
                f"{self.source} mixes devices on {x.device}: a traced program can keep the "
                "device it was traced on in its code (e.g. torch.arange(..., device='cpu')); "
                "trace it again on that device, or save it with torch.export: "
                f"{describe(exc)}"
            ) from None
        if isinstance(out, tuple | list) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise UsageError(f"{self.source} returned {type(out).__name__}, not a logits tensor")
        return out


def _teacher(
    model: torch.nn.Module,
    source: str,
    path: Any,
    fixed_mode: bool,
    batch: int | None = None,
    place: Callable[[torch.device], torch.nn.Module] | None = None,
    size_from: str | None = None,
    **options: Any,
) -> ModelTeacher:
    """Wrap ``model`` with its preprocessing and the options of the spec (``size_from``:
    where ``size`` came from when not from the spec)."""
    mean, std, size, in_chans = (options[k] for k in ("mean", "std", "size", "in_chans"))
    classes, probs = options["classes"], options["probs"]
    if not isinstance(probs, bool):
        raise UsageError(f"{source}: option probs must be true or false, got {probs!r}")
    teacher = ModelTeacher(
        model,
        preprocess(source, size, mean, std, in_chans),
        class_names(classes, source),
        probs,
        file_hash(path),
        source,
        fixed_mode,
        batch,
        place,
    ).eval()
    teacher.inputs = spec_inputs(teacher.preprocess, options, size_from)
    return teacher


def load_torchscript(ref, mean, std, size, in_chans, classes, probs, allow_code) -> ModelTeacher:
    """A TorchScript archive loaded on the CPU (move it with ``.to(device)``), only with the
    code opt-in: TorchScript runs its own code when loaded and when run."""
    source = f"torchscript:{ref}"
    path = existing_file(ref, "torchscript")
    if not code_allowed(allow_code):
        if not zipfile.is_zipfile(path):
            raise _not_torchscript(source, path, "not a zip archive")
        raise refuse_code(source, path, TORCHSCRIPT_RISK)
    archive = path.read_bytes()  # placed on another device from these bytes, not the file again

    def place(device: torch.device) -> torch.nn.Module:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
                return torch.jit.load(io.BytesIO(archive), map_location=device)
        except Exception as exc:  # torch raises RuntimeError/ValueError for a bad archive
            raise _not_torchscript(source, path, describe(exc)) from None

    return _teacher(
        place(torch.device("cpu")),
        source,
        path,
        False,
        place=place,
        mean=mean,
        std=std,
        size=size,
        in_chans=in_chans,
        classes=classes,
        probs=probs,
    )


def load_exported(
    ref, mean, std, size, in_chans, classes, probs, allow_pickle, allow_code
) -> ModelTeacher:
    """A torch.export program; channels, size and a fixed batch size come from its input.

    Without the opt-ins nothing in the archive is unpickled or evaluated as code (see
    ``program_check``), and a program calling anything outside ``RULE`` is refused.
    """
    source = f"export:{ref}"
    path = existing_file(ref, "export")
    trust_code = code_allowed(allow_code)
    program = _load_program(path, source, pickle_allowed(allow_pickle), trust_code)
    refused = [] if trust_code else refused_calls(program.graph_module)
    if refused:
        raise refuse_code(
            source,
            path,
            f"calls {', '.join(refused)}, which is not among what kdplug runs unasked ({RULE}) "
            "and can read or write files or run other code",
            "export the model again using torch's own tensor operators only",
        )
    shape = _input_shape(program) or []
    in_chans, size, from_shape = shape_defaults(shape, in_chans, size)

    def place(device: torch.device) -> torch.nn.Module:
        from torch.export.passes import move_to_device_pass

        return _module(move_to_device_pass(program, device), source, path)

    return _teacher(
        _module(program, source, path),
        source,
        path,
        True,
        fixed_batch(shape[0], source) if shape else None,
        place,
        "the program's input shape" if from_shape else None,
        mean=mean,
        std=std,
        size=size,
        in_chans=in_chans,
        classes=classes,
        probs=probs,
    )


def _load_program(path: Path, source: str, trust_pickle: bool, trust_code: bool) -> Any:
    found = archive_findings(path)
    if found.pickled and not trust_pickle:
        stored = f"stores objects only pickle loads ({', '.join(found.pickled[:3])})"
        raise refuse_pickle(source, path, "a program without custom objects", stored)
    if found.code and not trust_code:
        raise refuse_code(
            source,
            path,
            f"holds {found.code[0]}, which torch.export.load would run",
            "save the program again with torch.export.save",
        )
    guard = contextlib.nullcontext() if trust_pickle else weights_only_loads()
    try:
        with guard:
            return torch.export.load(str(path))
    except pickle.UnpicklingError:
        raise refuse_pickle(
            source, path, "a torch.export.save program", "holds data that only pickle can load"
        ) from None
    except Exception as exc:
        raise _not_a_program(source, path, exc) from None


def _module(program: Any, source: str, path: Path) -> torch.nn.Module:
    """The program as a module without its stored guard code (Python source that
    ``module()`` would exec); torch still checks inputs against the program's shapes."""
    try:
        if "check_guards" in inspect.signature(program.module).parameters:
            return program.module(check_guards=False)
        return program.module()
    except Exception as exc:  # torch's AssertionError for constants of the wrong kind, ...
        raise _not_a_program(source, path, exc) from None


def _not_a_program(source: str, path: Path, exc: Exception) -> UsageError:
    return UsageError(
        f"{source}: cannot load {path} as a torch.export program (corrupt, truncated or "
        f"not a torch.export.save .pt2 file): {describe(exc)}"
    )


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


def _not_torchscript(source: str, path: Path, why: str) -> UsageError:
    return UsageError(
        f"{source}: cannot load {path} as TorchScript (corrupt, truncated or not a "
        f"torch.jit.save file): {why}"
    )
