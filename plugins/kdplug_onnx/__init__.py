"""ONNX teachers through onnxruntime (the optional extra ``kdplug[onnx]``).

Inputs are adapted like the torch model teachers' (``size``/``mean``/``std``/``in_chans``,
defaulting to the graph's static input shape); ``probs=true`` marks a graph ending in softmax.
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
        import onnxruntime  # noqa: F401
    except ImportError:
        raise kdplug.UsageError(
            "onnx teachers need onnxruntime: pip install 'kdplug[onnx]'"
        ) from None
    from kdplug_onnx.session import load_onnx

    return load_onnx(ref, mean, std, size, in_chans, classes, probs)


@kdplug.hookimpl
def register_teachers(register):
    register("onnx", onnx)
