"""An onnxruntime session as a teacher: adapt inputs in torch, run the graph, return logits."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from kdplug.api import (
    Preprocess,
    UsageError,
    class_names,
    describe,
    existing_file,
    file_hash,
    fixed_batch,
    preprocess,
    probs_to_logits,
    run_in_batches,
)
from kdplug_onnx.check import check_model

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class OnnxTeacher:
    """``teacher(x) -> logits [B, C]``: the graph's first float output of rank 2.

    Runs on the CPU provider, or on CUDA when ``x`` is on a GPU and onnxruntime has CUDA.
    A graph with a fixed batch size is run in chunks of that size.
    """

    def __init__(
        self,
        path: str,
        runner: ort.InferenceSession,
        preprocess: Preprocess,
        classes: list[str] | None,
        probs: bool,
        fingerprint: str,
        source: str,
    ):
        self.path = path
        self.preprocess = preprocess
        self.classes = classes
        self.probs = probs
        self.fingerprint = fingerprint
        self.source = source
        self.sessions = {"cpu": runner}
        first = runner.get_inputs()[0]
        self.input_name = first.name
        self.batch = fixed_batch(first.shape[0], source) if first.shape else None
        self.output_name = _logits_output(runner, source)

    def _session(self, device: torch.device) -> ort.InferenceSession:
        kind = "cuda" if device.type == "cuda" and CUDA in ort.get_available_providers() else "cpu"
        if kind not in self.sessions:
            self.sessions[kind] = session(self.path, [CUDA, CPU], self.source)
        return self.sessions[kind]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        runner = self._session(x.device)
        inputs = self.preprocess.to(x.device)(x).float().cpu()

        def run(chunk: torch.Tensor) -> torch.Tensor:
            (out,) = runner.run([self.output_name], {self.input_name: chunk.numpy()})
            return torch.from_numpy(np.asarray(out, dtype=np.float32))

        z = run_in_batches(run, inputs, self.batch).to(x.device)
        return probs_to_logits(z) if self.probs else z


def session(path: str, providers: list[str], source: str) -> ort.InferenceSession:
    """An InferenceSession, or a UsageError naming the file when it is not a valid model."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as exc:  # InvalidProtobuf, Fail, ... for a bad file
        raise UsageError(
            f"{source}: cannot load {path} as an ONNX model (corrupt, truncated or not "
            f"ONNX): {describe(exc)}"
        ) from None


def _logits_output(runner: ort.InferenceSession, source: str) -> str:
    for output in runner.get_outputs():
        if output.type == "tensor(float)" and len(output.shape or ()) == 2:
            return output.name
    found = [(o.name, o.type, o.shape) for o in runner.get_outputs()]
    raise UsageError(f"{source}: no float output of shape [batch, classes] (outputs: {found})")


def load_onnx(ref, mean, std, size, in_chans, classes, probs) -> OnnxTeacher:
    """Open ``ref``; channels and size default to the graph input's static shape."""
    source = f"onnx:{ref}"
    path = existing_file(ref, "onnx")
    if not isinstance(probs, bool):
        raise UsageError(f"{source}: option probs must be true or false, got {probs!r}")
    check_model(path, source)
    runner = session(str(path), [CPU], source)
    shape = list(runner.get_inputs()[0].shape or [])
    if len(shape) == 4:
        if in_chans is None and isinstance(shape[1], int):
            in_chans = shape[1]
        if size is None and all(isinstance(s, int) for s in shape[2:]):
            size = list(shape[2:])
    return OnnxTeacher(
        str(path),
        runner,
        preprocess(source, size, mean, std, in_chans),
        class_names(classes, source),
        probs,
        file_hash(path),
        source,
    )
