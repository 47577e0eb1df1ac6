"""ONNX teachers through onnxruntime (the optional extra ``kdplug[onnx]``).

Inputs are adapted like the torch model teachers' (``size``/``mean``/``std``/``in_chans``,
defaulting to the graph's static input shape); ``probs=true`` marks a graph ending in softmax.
Files are checked first with the ``onnx`` package (see ``kdplug_onnx.check``): external data
from outside the model's folder and custom operator domains are refused.
"""

from __future__ import annotations

import kdplug

__version__ = kdplug.__version__


def onnx(
    ref: str,
    mean: float | list[float] | None = None,
    std: float | list[float] | None = None,
    size: int | list[int] | None = None,
    in_chans: int | None = None,
    classes: str | int | list[str | int] | None = None,
    probs: bool = False,
):
    """An ONNX model run by onnxruntime (CPU, or CUDA for cuda inputs); needs kdplug[onnx]."""
    try:
        import onnx  # noqa: F401  (reads the graph for the checks before onnxruntime runs it)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise kdplug.UsageError(
            f"onnx teachers need onnxruntime and onnx (no module {exc.name!r}): "
            "pip install 'kdplug[onnx]'"
        ) from None
    from kdplug_onnx.session import load_onnx

    return load_onnx(ref, mean, std, size, in_chans, classes, probs)


@kdplug.hookimpl
def register_teachers(register):
    register("onnx", onnx)
