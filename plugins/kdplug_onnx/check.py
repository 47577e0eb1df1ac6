"""What an ONNX file may reference, checked with the ``onnx`` package before onnxruntime opens it.

Refused, in one line naming the file and the tensor or node:

- external data (``data_location: EXTERNAL``) whose path is absolute or resolves, through
  ``..`` or symlinks, outside the model's folder: onnxruntime would read that file into the
  weights (versions before 1.18 do not check);
- nodes in an operator domain onnxruntime does not ship (``DOMAINS``) and no model-local
  function defines: only a registered custom-op library can run them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdplug.api import UsageError

# the operator domains onnxruntime's own kernels implement ('' and ai.onnx are the standard ops)
DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc"}
)


def check_model(path: Path, source: str) -> None:
    """Refuse ``path`` when it reads data from outside its folder or needs custom ops."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return  # not a model onnx can parse: onnxruntime says so in one line
    graphs = _graphs(model)
    local = {(f.domain, f.name) for f in model.functions}
    for node in (node for graph in graphs for node in graph.node):
        if node.domain not in DOMAINS and (node.domain, node.op_type) not in local:
            raise UsageError(
                f"{source}: node {node.name or node.op_type!r} of {path} is the operator "
                f"{node.op_type} of domain {node.domain!r}, which onnxruntime does not ship; "
                "kdplug loads no custom-op library, so export the model with standard ops"
            )
    roots = {path.parent.resolve(), path.resolve().parent}
    for tensor in _tensors(graphs):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (path.parent / location).resolve()
        if Path(location).is_absolute() or not any(target.is_relative_to(r) for r in roots):
            raise UsageError(
                f"{source}: tensor {tensor.name!r} of {path} reads its data from {location!r}, "
                f"outside the model's folder ({target}); keep external data files next to "
                "the model"
            )


def _graphs(model: Any) -> list[Any]:
    """The main graph, the model's functions and every sub-graph (If, Loop, Scan bodies)."""
    found, todo = [], [model.graph, *model.functions]
    while todo:
        graph = todo.pop()
        found.append(graph)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    todo.append(attribute.g)
                todo.extend(attribute.graphs)
    return found


def _tensors(graphs: list[Any]) -> Iterator[Any]:
    """Every tensor of ``graphs`` that can keep its data in an external file."""
    for graph in graphs:
        yield from getattr(graph, "initializer", ())
        yield from (sparse.values for sparse in getattr(graph, "sparse_initializer", ()))
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("sparse_tensor"):
                    yield attribute.sparse_tensor.values
                yield from (sparse.values for sparse in attribute.sparse_tensors)
