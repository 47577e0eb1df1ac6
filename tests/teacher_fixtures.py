"""Small artifacts the teacher tests build themselves: digits arrays, a tiny CNN, ONNX graphs."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def digits_arrays(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a DATA spec in order, through kdplug's data path: x [N, 1, 8, 8], y [N]."""
    from kdplug.data import batches, load_data

    xs, ys = [], []
    for x, y, _ in batches(load_data(spec), 512):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


class TinyCNN(torch.nn.Module):
    """[B, in_chans, H, W] -> [B, classes] logits; optionally ending in softmax."""

    def __init__(self, in_chans: int = 1, classes: int = 10, softmax: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_chans, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, classes)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(torch.relu(self.conv(x)).mean((2, 3)))
        return torch.softmax(z, -1) if self.softmax else z


def onnx_linear(path, weight: np.ndarray, bias: np.ndarray, softmax: bool = False) -> None:
    """An ONNX graph ``x [B, 1, 8, 8] -> Flatten -> Gemm(weight [64, C], bias) (-> Softmax)``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    classes = weight.shape[1]
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "b"], ["z" if softmax else "y"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["y"], axis=1))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", classes])],
        [
            numpy_helper.from_array(weight.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def fit_logistic(spec: str):
    """A LogisticRegression fitted on the rows of ``spec`` (x flattened as kdplug gives it)."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits_arrays(spec)
    return LogisticRegression(max_iter=500).fit(x.reshape(len(x), -1).numpy(), y.numpy())


def save_torchscript(model: torch.nn.Module, path) -> None:
    """torch.jit.script + save, without torch's deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))
