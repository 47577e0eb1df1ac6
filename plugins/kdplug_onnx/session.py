"""An onnxruntime session as a teacher: adapt inputs in torch, run the graph, return logits.

Inputs and outputs are bound to torch's own memory (IOBinding), so a batch on a GPU stays
there; on CUDA the session runs on torch's current stream of the batch's GPU
(``user_compute_stream``), so no copy and no host sync is needed around it.
"""

from __future__ import annotations

import logging

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
    shape_defaults,
    spec_inputs,
)
from kdplug_onnx.check import check_model

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
log = logging.getLogger("kdplug")


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
        self.output_shape = next(
            o.shape for o in runner.get_outputs() if o.name == self.output_name
        )

    def _session(self, device: torch.device) -> ort.InferenceSession:
        """The session for ``device``: the CPU one, or one on GPU ``device.index`` running on
        torch's current stream there (a CPU one, with a warning, where CUDA cannot run)."""
        if device.type != "cuda":
            return self.sessions["cpu"]
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = f"cuda:{index}"
        if key not in self.sessions:
            self.sessions[key] = self._cuda_session(index)
        return self.sessions[key]

    def _cuda_session(self, index: int) -> ort.InferenceSession:
        if CUDA not in ort.get_available_providers():
            log.warning(
                "%s runs on the CPU: this onnxruntime has no CUDA provider (install "
                "onnxruntime-gpu for the CUDA version of torch)",
                self.source,
            )
            return self.sessions["cpu"]
        stream = torch.cuda.current_stream(index).cuda_stream
        options = {"device_id": index, "user_compute_stream": str(stream)}
        runner = session(self.path, [(CUDA, options), CPU], self.source)
        if CUDA not in runner.get_providers():
            log.warning(
                "%s runs on the CPU: onnxruntime could not start its CUDA provider on GPU %d "
                "(its CUDA or cuDNN libraries do not match; see onnxruntime's log)",
                self.source,
                index,
            )
        return runner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        runner = self._session(x.device)
        on_gpu = CUDA in runner.get_providers()
        inputs = self.preprocess.to(x.device)(x).float()
        inputs = inputs if on_gpu else inputs.cpu()
        z = run_in_batches(lambda chunk: self._run(runner, chunk), inputs, self.batch)
        z = z.to(x.device)
        return probs_to_logits(z) if self.probs else z

    def _run(self, runner: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` on ``x``'s device, read and written in place by the session."""
        x = x.contiguous()
        kind, index = x.device.type, x.device.index or 0
        binding = runner.io_binding()
        binding.bind_input(self.input_name, kind, index, np.float32, tuple(x.shape), x.data_ptr())
        classes = self.output_shape[1]
        if not isinstance(classes, int):  # a symbolic class count: the session allocates
            binding.bind_output(self.output_name, kind, index)
            runner.run_with_iobinding(binding)
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).float().to(x.device)
        out = torch.empty((x.shape[0], classes), dtype=torch.float32, device=x.device)
        binding.bind_output(
            self.output_name, kind, index, np.float32, tuple(out.shape), out.data_ptr()
        )
        runner.run_with_iobinding(binding)
        return out


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
    in_chans, size, from_shape = shape_defaults(shape, in_chans, size)
    teacher = OnnxTeacher(
        str(path),
        runner,
        preprocess(source, size, mean, std, in_chans),
        class_names(classes, source),
        probs,
        file_hash(path),
        source,
    )
    options = {"size": size, "mean": mean, "std": std}
    from_graph = "the graph's input shape" if from_shape else None
    teacher.inputs = spec_inputs(teacher.preprocess, options, from_graph)
    return teacher
