"""What a torch.export archive holds and calls, checked before kdplug runs it.

``torch.export.load`` (as of torch 2.14) unpickles a constant whose config entry in
``data/constants/MODEL_constants_config.json`` names a path not starting with ``tensor_``
(``custom_obj_*`` through torch's TorchBind unpickler, ``opaque_obj_*`` through
``pickle.loads``), wherever in the archive that path points; it loads any compiled
AOTInductor library under ``data/aotinductor/``; and it evaluates every shape expression
(``expr_str``) of the program JSON with ``sympy.sympify``, which is Python ``eval``.
``archive_findings`` reads the archive with torch's own reader, the way torch does, to find
these before torch touches them.

``refused_calls`` lists what a loaded program calls outside ``RULE``: operators of the
``aten`` and ``prims`` namespaces except those in ``IO_OPS``, the control-flow operators in
``CONTROL_FLOW`` (their branches and bodies are checked too), and the Python helpers in
``SHAPE_HELPERS`` that export writes for shape arithmetic.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.utils._sympy.functions as sympy_functions

RULE = (
    "torch's aten and prims operators except file I/O (aten.from_file, aten.save, "
    "aten._print), plus control flow and shape arithmetic"
)
SAFE_NAMESPACES = frozenset({"aten", "prims"})
IO_OPS = frozenset({"from_file", "save", "_print"})  # aten ops that read, write or print
CONTROL_FLOW = frozenset(
    {
        "cond",
        "map_impl",
        "while_loop",
        "scan",
        "associative_scan",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
    }
)
SHAPE_HELPERS = frozenset(
    {
        *(getattr(operator, n) for n in ("getitem", "add", "sub", "mul", "truediv", "floordiv")),
        *(getattr(operator, n) for n in ("mod", "pow", "neg", "pos", "abs", "eq", "ne")),
        *(getattr(operator, n) for n in ("lt", "le", "gt", "ge", "and_", "or_", "not_")),
        operator.lshift,
        operator.rshift,
        math.ceil,
        math.floor,
        math.trunc,
        round,
        *(getattr(torch, f"sym_{n}") for n in ("int", "float", "ite", "max", "min", "not")),
        *(getattr(torch, f"sym_{n}") for n in ("sqrt", "sum")),
    }
)

# names a shape expression (sympy's srepr, as torch.export.save writes it) may use
SHAPE_NAMES = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling sqrt "
    "Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan "
    "GreaterThan And Or Not Xor Piecewise ExprCondPair ITE true false True False None "
    "oo zoo nan Infinity NegativeInfinity BooleanTrue BooleanFalse Half One Zero NegativeOne "
    "int_oo IntInfinity NegativeIntInfinity".split()
) | frozenset(
    name
    for name, value in vars(sympy_functions).items()
    if isinstance(value, type) and issubclass(value, sympy.Basic)
)
SYMBOL = re.compile(r"[a-z]+[0-9]+")  # s0, u3, zf1: torch's symbol names
PLAIN_TEXT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[+-]?[0-9.]+(e[+-]?[0-9]+)?")
SHAPE_SYNTAX = (
    ast.Expression,
    ast.Call,
    ast.keyword,
    ast.Load,
    ast.Tuple,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.boolop,
)


@dataclass
class ArchiveFindings:
    """What torch.export.load would unpickle (``pickled``) or run (``code``) from an archive."""

    pickled: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)


def archive_findings(path: Path) -> ArchiveFindings:
    """Read ``path`` as torch.export.load does and as its legacy fallback does (zipfile)."""
    found = ArchiveFindings()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if "/data/aotinductor/" in f"/{info.filename}":
                    found.code.append(f"compiled AOTInductor code ({info.filename})")
                if info.filename.endswith(".json"):
                    _check_expressions(archive.read(info), found)
    except (zipfile.BadZipFile, OSError, RuntimeError):
        pass  # not an archive Python can read: torch's legacy fallback cannot either
    _check_with_torch_reader(path, found)
    return found


def _check_with_torch_reader(path: Path, found: ArchiveFindings) -> None:
    try:
        from torch.export.pt2_archive import _package as pt2
        from torch.export.pt2_archive import constants as names
    except ImportError:  # torch before 2.8 loads constants with torch.load (guarded)
        return
    try:
        reader = pt2.PT2ArchiveReader(str(path))
        files = reader.get_file_names()
    except Exception:  # torch.export.load cannot open it either, so reads nothing from it
        return
    prefix, suffix = names.MODELS_FILENAME_FORMAT.split("{}")
    for file in files:
        if file.startswith(names.AOTINDUCTOR_DIR):
            found.code.append(f"compiled AOTInductor code ({file})")
        if not file.startswith(names.MODELS_DIR):
            continue
        _check_expressions(reader.read_bytes(file), found)
        model = file[len(prefix) : -len(suffix)]
        config = names.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model)
        if f"{names.CONSTANTS_DIR}{model}.pt" in files or config not in files:
            continue  # legacy constants: read with torch.load, forced weights-only
        try:
            entries = pt2._load_payload_config(reader, config).config
        except Exception:  # torch's own parse of it fails the same way: nothing is loaded
            continue
        for name, entry in entries.items():
            if not entry.path_name.startswith(names.TENSOR_CONSTANT_FILENAME_PREFIX):
                found.pickled.append(f"constant {name} at {entry.path_name}")


def _check_expressions(data: bytes, found: ArchiveFindings) -> None:
    """Every ``expr_str`` in a JSON member must be shape arithmetic, not other Python."""
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError):
        return  # torch cannot parse it either
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            text = item.get("expr_str")
            if isinstance(text, str) and not is_shape_expression(text):
                found.code.append(f"a shape expression that is other Python code ({text[:60]!r})")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def is_shape_expression(text: str) -> bool:
    """Whether ``text`` is sympy arithmetic over torch's shape symbols and nothing else:
    calls of ``SHAPE_NAMES``, numbers, plain strings, operators; no attributes, subscripts,
    lambdas or other names."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    return all(_shape_node(node) for node in ast.walk(tree))


def _shape_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name)
    if isinstance(node, ast.Name):
        return node.id in SHAPE_NAMES or SYMBOL.fullmatch(node.id) is not None
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, str):
            return PLAIN_TEXT.fullmatch(value) is not None
        return value is None or isinstance(value, bool | int | float)
    return isinstance(node, SHAPE_SYNTAX)


def refused_calls(graph_module: torch.fx.GraphModule) -> list[str]:
    """The calls of ``graph_module`` and of every sub-graph (control-flow branches and
    bodies) outside the allow-list, by name; empty when everything is allowed."""
    refused = set()
    for module in graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("call_module", "call_method"):
                refused.add(f"{node.op} {node.target}")
            elif node.op == "call_function" and not _allowed(node.target):
                refused.add(_call_name(node.target))
    return sorted(refused)


def _allowed(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::", 1)[-1]
        return target.namespace in SAFE_NAMESPACES and name not in IO_OPS
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.namespace == "higher_order" and target.name() in CONTROL_FLOW
    try:
        return target in SHAPE_HELPERS
    except TypeError:  # unhashable
        return False


def _call_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::', 1)[-1]}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"{target.namespace}.{target.name()}"
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(target)
