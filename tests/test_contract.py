"""The component contract (kdplug/components.py) is all that the engines read.

1. Every ``getattr``/``hasattr`` in kdplug/ (the CLI aside) and every attribute read on a
   variable holding a component names a member declared on that component's Protocol and
   documented in docs/plugins.md; a ``getattr`` default is the declared one, and defaults
   and ``hasattr`` are only for optional members. The other ``getattr`` calls are listed
   in NOT_COMPONENTS, each with its reason.
2. docs/plugins.md's tables list exactly the declared members, with their defaults.
3. kdplug's own components have every required member, and their optional ones hold
   values of the declared kind (a T=auto loss can fit, a fixed-T loss has nothing to fit).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from kdplug.components import (
    PROTOCOLS,
    Combiner,
    LabelGenerator,
    LossStrategy,
    Producer,
    Student,
    Teacher,
    members,
    missing,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"

# what the engines call a component -> the Protocols that object follows
HOLDERS = {
    "teacher": (Teacher,),
    "model": (Student,),
    "student": (Student,),
    "loss": (LossStrategy,),
    "combiner": (Combiner,),
    "generator": (LabelGenerator,),
    "producer": (Producer,),
}
# names that hold a component in one file only
FILE_HOLDERS = {("kdplug/fitting.py", "component"): (Combiner, LossStrategy)}

# (file, object, attribute) read with getattr/hasattr or on a component-named variable that
# is not about a component's contract; "*" is an attribute named by a variable
NOT_COMPONENTS = {
    ("kdplug/api.py", "importlib.import_module(module)", "*"): "the public names' modules",
    ("kdplug/augment_views.py", "augment", "*"): "the ViewAugment dataclass's own fields",
    ("kdplug/components.py", "obj", "*"): "missing(): the members it checks",
    ("kdplug/components.py", "own[name]", "__kdplug_optional__"): "the @optional mark",
    ("kdplug/data.py", "self.dataset", "_fingerprint"): "datasets.Dataset's fingerprint",
    ("kdplug/data.py", "image", "filename"): "a PIL image's file, for messages",
    ("kdplug/data.py", "image", "tag_v2"): "a PIL TIFF image's tags",
    ("kdplug/data.py", "first", "mode"): "telling PIL images from arrays",
    ("kdplug/engines/demo.py", "model", "fit"): "the scikit-learn estimator the demo trains",
    ("kdplug/device.py", "torch.backends", "mps"): "older torch builds have no mps backend",
    ("kdplug/engines/distill.py", "self", "*"): "DistillConfig's own fields",
    ("kdplug/engines/distill.py", "config", "*"): "DistillConfig's own fields",
    ("kdplug/engines/distill.py", "teacher", "requires_grad_"): "a teacher that is an nn.Module",
    (
        "kdplug/features.py",
        "self.model",
        "no_weight_decay",
    ): "timm's optimizer reads it as timm does",
    (
        "kdplug/label_shards.py",
        "decided",
        "*",
    ): "a generator's result checked against Labels' fields",
    ("kdplug/metrics.py", "probs", "detach"): "telling tensors from arrays",
    ("kdplug/metrics.py", "labels", "cpu"): "telling tensors from arrays",
    ("kdplug/outputs.py", "value", "tolist"): "tensors and arrays in JSON",
    ("kdplug/plugins.py", "plugin", "__version__"): "a plugin module's version",
    ("kdplug/plugins.py", "self.pm.hook", "*"): "pluggy's hook callers",
    ("kdplug/plugins.py", "ep", "dist"): "an entry point's distribution",
    ("kdplug/registry.py", "member", "__name__"): "typing members, for messages",
    ("kdplug/engines/cache.py", "cfg", "*"): "CacheConfig's own fields",
    ("kdplug/engines/cache.py", "torch", "*"): "torch dtypes by name",
    ("kdplug/engines/cache.py", "os", "posix_fallocate"): "a POSIX call some systems lack",
    ("kdplug/engines/cache.py", "teacher", "pop"): "a teacher's record (a dict) in store.json",
    ("kdplug/teachers.py", "teacher", "to"): "a teacher that is a torch.nn.Module (checked)",
    ("kdplug/teachers.py", "teacher", "eval"): "a teacher that is a torch.nn.Module (checked)",
    ("kdplug/testing.py", "plugin", "__name__"): "a plugin module's name",
}


def holder_name(node: ast.expr) -> str | None:
    """The last name of ``node``: ``loss`` for ``loss`` and for ``self.loss``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def reads(tree: ast.AST):
    """``(how, object node, attribute or "*", default node or None, line)`` of every
    getattr/hasattr call and every attribute read in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
            name = node.args[1]
            attr = name.value if isinstance(name, ast.Constant) else "*"
            default = node.args[2] if len(node.args) > 2 else None
            yield node.func.id, node.args[0], attr, default, node.lineno
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            yield "read", node.value, node.attr, None, node.lineno


def declared(protocols: tuple[type, ...], attr: str):
    """The member ``attr`` of the first of ``protocols`` that declares it, else None."""
    for protocol in protocols:
        if attr in members(protocol):
            return protocol, members(protocol)[attr]
        if protocol is Student and hasattr(torch.nn.Module, attr):
            return protocol, None  # a student is a torch.nn.Module
    return None


def doc_tables() -> dict[str, dict[str, str]]:
    """docs/plugins.md's member tables: protocol name -> {member: its default cell}."""
    text = DOCS.read_text()
    tables = {}
    for protocol in PROTOCOLS:
        found = re.search(rf"^### {protocol.__name__}\n(.*?)(?=^#)", text, re.M | re.S)
        rows = re.findall(r"^\| `(\w+)[^`]*` \| ([^|]+?) \|", found.group(1), re.M) if found else []
        tables[protocol.__name__] = dict(rows)
    return tables


def shown(default) -> str:
    """A default as docs/plugins.md's tables show it."""
    return f"`{dict(default) if isinstance(default, Mapping) else default!r}`"


def literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return f"<not a literal: {ast.unparse(node)}>"


def contract_problems(where: str, source: str, tables: dict[str, dict[str, str]]) -> list[str]:
    """What the code ``source`` of file ``where`` reads that the contract does not declare,
    document or default so."""
    problems = []
    for how, obj, attr, default, line in sorted(reads(ast.parse(source)), key=lambda r: r[4]):
        name = holder_name(obj)
        protocols = FILE_HOLDERS.get((where, name)) or HOLDERS.get(name)
        if (where, ast.unparse(obj), attr) in NOT_COMPONENTS:
            continue
        if protocols is None:
            if how != "read":
                call = f"{how}({ast.unparse(obj)}, {attr!r})"
                problems.append(f"{where}:{line}: {call} is in no Protocol nor NOT_COMPONENTS")
            continue
        found = declared(protocols, attr) if attr != "*" else None
        kinds = "/".join(p.__name__ for p in protocols)
        if found is None:
            problems.append(f"{where}:{line}: {name}.{attr} is not declared on {kinds}")
            continue
        protocol, member = found
        if member is None:
            continue  # a torch.nn.Module attribute of a student
        if attr not in tables[protocol.__name__]:
            problems.append(f"{where}:{line}: {protocol.__name__}.{attr} not in docs/plugins.md")
        if how == "hasattr" or default is not None:
            if member.required:
                problems.append(f"{where}:{line}: {protocol.__name__}.{attr} is required")
            elif default is not None and literal(default) != member.default:
                problems.append(
                    f"{where}:{line}: {attr} default {ast.unparse(default)} but "
                    f"{protocol.__name__} declares {member.default!r}"
                )
    return problems


def engine_sources() -> dict[str, str]:
    """``{path from the repository root: code}`` of kdplug/, the CLI aside."""
    paths = [p for p in sorted((ROOT / "kdplug").rglob("*.py")) if "cli" not in p.parts]
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in paths}


def test_the_engines_read_only_declared_and_documented_members():
    tables = doc_tables()
    problems = [
        problem
        for where, source in engine_sources().items()
        for problem in contract_problems(where, source, tables)
    ]
    assert not problems, "\n".join(problems)


def test_every_listed_exception_is_still_read():
    """NOT_COMPONENTS holds no entry the code no longer needs."""
    seen = {
        (where, ast.unparse(obj), attr)
        for where, source in engine_sources().items()
        for _, obj, attr, _, _ in reads(ast.parse(source))
    }
    assert sorted(set(NOT_COMPONENTS) - seen) == []


def test_the_scan_catches_undeclared_reads_wrong_defaults_and_unlisted_getattrs():
    code = (
        "def run(teacher, loss, producer, self, thing):\n"
        "    getattr(teacher, 'secret_size', 3)\n"
        "    getattr(teacher, 'uses_row_index', True)\n"
        "    hasattr(loss, 'ce_weight')\n"
        "    producer.names, loss.fit, thing.anything, self.loss.kd_weight\n"
        "    self.combiner.weights\n"
        "    getattr(thing, 'colour', None)\n"
    )
    problems = contract_problems("kdplug/probe.py", code, doc_tables())
    assert [p.split(": ", 1)[1] for p in problems] == [
        "teacher.secret_size is not declared on Teacher",
        "uses_row_index default True but Teacher declares False",
        "LossStrategy.ce_weight is required",
        "combiner.weights is not declared on Combiner",
        "getattr(thing, 'colour') is in no Protocol nor NOT_COMPONENTS",
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_docs_list_exactly_the_declared_members_with_their_defaults(protocol):
    table = doc_tables()[protocol.__name__]
    declared_members = members(protocol)
    assert set(table) == set(declared_members), "docs/plugins.md lists other members"
    for name, member in declared_members.items():
        cell = table[name]
        if member.required:
            assert cell == "required", name
        elif callable(member.default):  # an optional method: the cell says what it defaults to
            assert cell != "required" and cell, name
        else:
            assert cell == shown(member.default), name


def test_the_contract_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, kdplug.components; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- kdplug's own components ------------------------------------------------------------------


def is_float(value) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool)


def optional_callable(value) -> bool:
    return value is None or callable(value)


def channel_values(value) -> bool:
    return isinstance(value, Sequence) and all(is_float(v) for v in value)


# member -> what a value of it must be (every declared member has an entry)
VALID = {
    "__call__": callable,
    "classes": lambda v: v is None or all(isinstance(c, str) for c in v),
    "fingerprint": lambda v: v is None or isinstance(v, str),
    "name": lambda v: v is None or (isinstance(v, str) and bool(v)),
    "uses_row_index": lambda v: isinstance(v, bool),
    "uses_inputs": lambda v: isinstance(v, bool),
    "num_rows": lambda v: v is None or (isinstance(v, int) and v >= 0),
    "data_fingerprint": lambda v: v is None or isinstance(v, str),
    "inputs": lambda v: v is None or isinstance(v, Mapping),
    "normalize_like_data": optional_callable,
    "input_normalization": lambda v: v is None or (len(v) == 2 and all(map(channel_values, v))),
    "pretrained_cfg": lambda v: isinstance(v, Mapping),
    "data_kind": lambda v: v in ("image", "tabular"),
    "fit_inputs": optional_callable,
    "model_args": lambda v: v is None or isinstance(v, Mapping),
    "temperature": lambda v: is_float(v) and v > 0,
    "standardize": lambda v: isinstance(v, bool),
    "uses_teachers": lambda v: isinstance(v, bool),
    "ce_weight": lambda v: is_float(v) and v >= 0,
    "kd_weight": lambda v: is_float(v) and v >= 0,
    "fit": optional_callable,
    "set_epoch": callable,
    "predict": optional_callable,
    "topk": lambda v: v is None or (isinstance(v, int) and v >= 1),
    "private": lambda v: isinstance(v, bool),
    "teacher_probs": lambda v: isinstance(v, bool),
    "prepare": callable,
    "decide": callable,
    "summary": callable,
    "names": lambda v: isinstance(v, Sequence) and all(isinstance(n, str) for n in v),
    "specs": lambda v: (
        v is None or (isinstance(v, Sequence) and all(isinstance(n, str) for n in v))
    ),
    "known": lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 2,
    "teachers": lambda v: isinstance(v, Sequence),
    "rebuild_views": optional_callable,
    "fingerprints": callable,
    "to": callable,
    "check_rows": callable,
    "intermediates": optional_callable,
    "forward_intermediates": optional_callable,
    "forward_head": optional_callable,
    "strong_augment": lambda v: v is None or isinstance(v, Mapping),
    "unlabeled_ratio": lambda v: v is None or (is_float(v) and v > 0),
    "set_unlabeled_rows": callable,
    "consistency": optional_callable,
    "feature_stages": lambda v: v is None or (isinstance(v, Sequence) and len(v) > 0),
    "feature_teacher": lambda v: v is None or (isinstance(v, str) and bool(v)),
    "build_projector": optional_callable,
    "feature_loss": optional_callable,
    "state_dict": callable,
    "load_state_dict": callable,
    "request_features": optional_callable,
}


def test_every_declared_member_has_a_check():
    assert {m for p in PROTOCOLS for m in members(p)} == set(VALID)


def check_component(obj, protocol, skip=()) -> None:
    """``obj`` has every required member of ``protocol``, and each member it has holds a
    value of the declared kind (``skip``: members not readable yet)."""
    assert missing(obj, protocol) == [], type(obj).__name__
    for name in members(protocol):
        if name not in skip and hasattr(obj, name):
            assert VALID[name](getattr(obj, name)), f"{type(obj).__name__}.{name}"


def first_party(kind: str) -> list[str]:
    """The names of kdplug's own components of ``kind``."""
    from kdplug.plugins import get_manager

    manager = get_manager()
    own = {name for name, info in manager.plugins.items() if info.distribution == "kdplug"}
    return [c.name for c in manager.registries[kind] if c.plugin in own]


def create(kind: str, spec: str, *args):
    from kdplug.plugins import create

    return create(kind, spec, *args)


# specs beyond each component's defaults; and the spec of one that needs an option
MORE_SPECS = {
    "losses": ["kd,T=auto", "dkd,T=auto,warmup=2"],
    "label-generators": ["threshold,accuracy=0.98"],
}
NEEDS_OPTIONS = {"weighted": "weighted,weights=1;3"}
PROTOCOL_OF = {"losses": LossStrategy, "combiners": Combiner, "label-generators": LabelGenerator}


@pytest.mark.parametrize("kind", list(PROTOCOL_OF))
def test_kdplugs_own_losses_combiners_and_generators_follow_the_contract(kind):
    from kdplug.fitting import can_fit

    built = {}
    names = [NEEDS_OPTIONS.get(name, name) for name in first_party(kind)]
    for spec in names + MORE_SPECS.get(kind, []):
        built[spec] = component = create(kind, spec)
        auto = "T=auto" in spec  # its temperature is chosen by fit, unreadable before
        check_component(component, PROTOCOL_OF[kind], skip=("temperature",) if auto else ())
    if kind == "losses":  # fit is there exactly when there is something to fit
        assert {spec for spec, loss in built.items() if can_fit(loss)} == set(MORE_SPECS[kind])
        assert not built["ce"].uses_teachers and built["kd"].uses_teachers
    if kind == "combiners":
        assert {spec for spec, c in built.items() if can_fit(c)} == {"auto"}
        assert callable(built["auto"].predict)
    if kind == "label-generators":
        assert built["topk"].topk == 5 and built["pate"].private is True
        assert all(getattr(g, "topk", None) is None for s, g in built.items() if s != "topk")
        assert {spec for spec, g in built.items() if can_fit(g)} == set(MORE_SPECS[kind])


# -- teachers, students and producers, built from tiny files -----------------------------------

CLASSES = ["a", "b", "c"]


def tiny_csv(root: Path) -> str:
    """Six rows of two features and a label: a tabular DATA spec."""
    rows = ["x1,x2,label"] + [f"{i},{i % 2},{CLASSES[i % 3]}" for i in range(6)]
    if not (root / "rows.csv").exists():  # once: the store remembers the file it cached
        (root / "rows.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{root / 'rows.csv'}"


def logits_teacher(root: Path) -> str:
    if not (root / "z.npy").exists():
        np.save(root / "z.npy", np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))
    return f"logits:{root / 'z.npy'},classes=a;b;c"


def onnx_teacher(root: Path) -> str:
    from tests.teacher_fixtures import onnx_linear

    onnx_linear(root / "m.onnx", np.ones((64, 3)), np.zeros(3))
    return f"onnx:{root / 'm.onnx'}"


def sklearn_teacher(root: Path) -> str:
    import skops.io
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).normal(size=(12, 2))
    skops.io.dump(LogisticRegression().fit(x, np.arange(12) % 3), root / "lr.skops")
    return f"sklearn:{root / 'lr.skops'}"


def torchscript_teacher(root: Path) -> str:
    from tests.teacher_fixtures import TinyCNN

    torch.jit.script(TinyCNN(classes=3)).save(str(root / "m.ts"))
    return f"torchscript:{root / 'm.ts'},allow_code=true"


def student_dir(root: Path) -> Path:
    """A student directory of an untrained timm ``test_resnet`` on 1 x 8 x 8 images."""
    from kdplug.model_dir import save_student

    model = create("students", "timm:test_resnet", 3, 1)
    kwargs = dict(classes=CLASSES, input_size=[1, 8, 8], mean=[0.5], std=[0.25])
    save_student(root / "student", model, architecture="test_resnet", **kwargs)
    return root / "student"


def store_teacher(root: Path) -> str:
    return f"store:{tiny_store(root)}"


def tiny_store(root: Path) -> Path:
    """A store of one precomputed teacher over the six rows of ``tiny_csv``."""
    from kdplug.engines.cache import CacheConfig, run_cache

    if not (root / "store").exists():
        teachers, data = [logits_teacher(root)], [tiny_csv(root)]
        run_cache(CacheConfig(teachers, data, str(root / "store"), device="cpu", progress=False))
    return root / "store"


TEACHERS = {
    "logits": logits_teacher,
    "onnx": onnx_teacher,
    "sklearn": sklearn_teacher,
    "timm": lambda root: f"timm:test_resnet,checkpoint={student_dir(root)}",
    "torchscript": torchscript_teacher,
    "kdplug": lambda root: f"kdplug:{student_dir(root)}",
    "store": store_teacher,
}
# built elsewhere: torch.export takes seconds (tests/test_teacher_sources.py builds one)
NOT_BUILT = {"export": "ModelTeacher, as torchscript:"}


def test_every_own_teacher_is_built_here_or_said_why_not():
    assert set(first_party("teachers")) == set(TEACHERS) | set(NOT_BUILT)


@pytest.mark.parametrize("name", list(TEACHERS))
def test_kdplugs_own_teachers_follow_the_contract(name, tmp_path):
    teacher = create("teachers", TEACHERS[name](tmp_path))
    check_component(teacher, Teacher)
    assert getattr(teacher, "fingerprint", None), "every own teacher has a fingerprint"
    if getattr(teacher, "uses_row_index", False):
        assert teacher.num_rows == 6


def test_the_timm_student_follows_the_contract():
    student = create("students", "timm:test_resnet", 3, 1)
    check_component(student, Student)
    assert student.input_normalization is None  # no pretrained weights: distill measures
    assert student.pretrained_cfg["architecture"] == "test_resnet"
    given = create("students", "timm:test_resnet,mean=0.5,std=0.25", 3, 1)
    assert given.input_normalization == ([0.5], [0.25])


def test_the_tabular_student_follows_the_contract():
    student = create("students", "tabular:mlp", 3, 5)
    check_component(student, Student)
    assert (student.data_kind, student.pretrained_cfg["architecture"]) == ("tabular", "mlp")
    assert student.model_args == {"widths": [256, 128], "dropout": 0.1, "activation": "relu"}


def test_the_live_teachers_and_the_store_are_producers(tmp_path):
    from kdplug.data import load_data
    from kdplug.store.producer import store_producer
    from kdplug.teachers import build_teacher_set

    store = tiny_store(tmp_path)
    source = load_data(tiny_csv(tmp_path))
    live = build_teacher_set([logits_teacher(tmp_path)], CLASSES)
    stored = store_producer(str(store), source, None, CLASSES)
    for producer in (live, stored):
        check_component(producer, Producer)
        assert producer.to("cpu") is producer
        producer.check_rows(6)
        out = producer(torch.zeros(2, 2), torch.tensor([0, 5]))
        assert out.logits.shape == (1, 2, 3) and out.known.shape == (1, 3)
    assert stored.rebuild_views is not None and getattr(live, "rebuild_views", None) is None
    assert stored.names == live.names and list(live.teachers)
