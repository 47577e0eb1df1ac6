"""Model files that carry code: harmless payloads never take effect without the opt-in.

Each payload creates a marker file (standing for any code or file write). TorchScript needs
the code opt-in; torch.export programs load without it when they only call torch's tensor
operators; ONNX files may not read data from outside their folder nor use custom ops.
"""

import json
import logging
import os
import pickle
import re
import sys
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdplug import UsageError
from kdplug.cli import build_cli
from kdplug.plugins import create
from tests.teacher_fixtures import TinyCNN, onnx_linear, save_torchscript
from tests.test_teacher_sources import TouchMarker, rewrite_archive

torch.manual_seed(0)
X = torch.rand(5, 1, 8, 8)


@pytest.fixture(autouse=True)
def no_opt_ins(monkeypatch):
    """No opt-in from the environment; one a CLI flag sets is undone after the test."""
    for env in ("KDPLUG_ALLOW_CODE", "KDPLUG_ALLOW_PICKLE"):
        monkeypatch.setenv(env, "")


def teacher(spec: str):
    return create("teachers", spec)


def label(teacher_spec: str, data: str, out, *flags: str):
    args = ["label", "--teacher", teacher_spec, "--data", data, "--out", str(out), *flags]
    return CliRunner().invoke(build_cli(), args)


def error_line(result) -> str:
    """The one ``Error:`` line of a failed command (exit code 2)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def member(path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith(suffix)))


# -- torch.export ------------------------------------------------------------------------------


def export_cnn(path, dynamic: bool = True, model: torch.nn.Module | None = None):
    """``model`` (a TinyCNN) exported on a [2, 1, 8, 8] example, batch dim dynamic or fixed."""
    model = model or TinyCNN().eval()
    shapes = ({0: torch.export.Dim("b")},) if dynamic else None
    program = torch.export.export(model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return program


@pytest.mark.parametrize("path_name", ["opaque_obj_/c", "opaque_obj_0"])
def test_pt2_constant_torch_would_unpickle_is_refused_wherever_it_points(
    tmp_path, digits_splits, path_name
):
    export_cnn(tmp_path / "good.pt2")
    marker = tmp_path / "unpickled"
    entry = {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}
    rewrite_archive(
        tmp_path / "good.pt2",
        tmp_path / "evil.pt2",
        {"constants_config.json": json.dumps({"config": {"c": entry}}).encode()},
        {f"data/constants/{path_name}": pickle.dumps(TouchMarker(marker))},
    )
    result = label(f"export:{tmp_path / 'evil.pt2'}", digits_splits["labeled"], tmp_path / "o")
    line = error_line(result)
    assert f"stores objects only pickle loads (constant c at {path_name})" in line
    assert "--allow-pickle" in line and not marker.exists()
    with pytest.raises(UsageError):  # the payload is real: with the opt-in torch unpickles it
        teacher(f"export:{tmp_path / 'evil.pt2'},allow_pickle=true")
    assert marker.exists()


def replace_in_program(src, dst, edit) -> None:
    """Copy the .pt2 ``src`` to ``dst`` with its program JSON passed through ``edit``."""
    program = json.loads(member(src, "models/model.json"))
    rewrite_archive(src, dst, {"models/model.json": json.dumps(edit(program)).encode()})


def test_pt2_shape_expression_holding_code_is_never_evaluated(tmp_path):
    export_cnn(tmp_path / "good.pt2")
    marker = tmp_path / "evaluated"
    text = member(tmp_path / "good.pt2", "models/model.json").decode()
    symbol = re.search(r"Symbol\('s\d+', positive=True, integer=True\)", text).group()
    code = f"(__import__('pathlib').Path('{marker}').touch(), {symbol})[1]"
    rewrite_archive(
        tmp_path / "good.pt2",
        tmp_path / "evil.pt2",
        {"models/model.json": text.replace(symbol, code).encode()},
    )
    with pytest.raises(UsageError, match=r"shape expression that is other Python code.*allow-code"):
        teacher(f"export:{tmp_path / 'evil.pt2'}")
    assert not marker.exists()
    teacher(f"export:{tmp_path / 'evil.pt2'},allow_code=true")  # torch evaluates it: real code
    assert marker.exists()


def test_pt2_guard_code_is_never_compiled_or_run(tmp_path):
    model = TinyCNN().eval()
    export_cnn(tmp_path / "good.pt2", model=model)
    marker = tmp_path / "guarded"
    guard = f"__import__('pathlib').Path('{marker}').touch() is None"
    replace_in_program(
        tmp_path / "good.pt2", tmp_path / "evil.pt2", lambda p: {**p, "guards_code": [guard]}
    )
    t = teacher(f"export:{tmp_path / 'evil.pt2'}")
    with torch.no_grad():
        torch.testing.assert_close(t(X), model(X))
    assert not marker.exists()


class Branchy(torch.nn.Module):
    """TinyCNN's logits, plus one or minus one as the input's sum is positive (torch.cond)."""

    def __init__(self):
        super().__init__()
        self.cnn = TinyCNN()

    def forward(self, x):
        z = self.cnn(x)
        return torch.cond(x.sum() > 0, lambda z: z + 1, lambda z: z - 1, (z,))


def add_from_file(graph_module: torch.fx.GraphModule, marker) -> None:
    """Insert ``torch.from_file(marker, shared=True)`` (it creates the file) before the output."""
    graph = graph_module.graph
    fake = next(n.meta["val"] for n in graph.nodes if n.op == "placeholder").fake_mode
    with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
        node = graph.call_function(
            torch.ops.aten.from_file.default,
            (str(marker),),
            {"shared": True, "size": 4, "dtype": torch.uint8},
        )
        with fake:
            node.meta["val"] = torch.empty(4, dtype=torch.uint8)
    graph_module.recompile()


@pytest.mark.parametrize("where", ["graph", "cond branch"])
def test_pt2_calling_a_file_op_is_refused_by_name(tmp_path, where):
    model = Branchy().eval()
    program = export_cnn(tmp_path / "good.pt2", model=model)
    marker = tmp_path / "written"
    target = program.graph_module
    if where == "cond branch":
        target = next(m for n, m in target.named_children() if n.startswith("true_graph"))
    add_from_file(target, marker)
    torch.export.save(program, str(tmp_path / "evil.pt2"))
    with pytest.raises(UsageError, match=r"calls aten\.from_file, which is not among.*allow-code"):
        teacher(f"export:{tmp_path / 'evil.pt2'}")
    assert not marker.exists()
    with torch.no_grad():  # the opt-in runs it
        teacher(f"export:{tmp_path / 'evil.pt2'},allow_code=true")(X)
    assert marker.exists()


def test_pt2_with_compiled_aoti_code_is_refused(tmp_path):
    export_cnn(tmp_path / "good.pt2")
    library = {"data/aotinductor/model/model.so": b"\x7fELF not really"}
    rewrite_archive(tmp_path / "good.pt2", tmp_path / "aoti.pt2", add=library)
    with pytest.raises(UsageError, match=r"compiled AOTInductor code .*model\.so.*allow-code"):
        teacher(f"export:{tmp_path / 'aoti.pt2'}")


class Shapes(torch.nn.Module):
    """Pooling, reshape and slicing on dynamic sizes: export writes shape arithmetic."""

    def forward(self, x):
        y = torch.nn.functional.max_pool2d(x, 2)
        z = y.reshape(x.shape[0] * 2, -1)
        return z[: x.shape[0] // 2 + 1].sum(1, keepdim=True) * (x.shape[2] / x.shape[3])


def test_honest_export_programs_load_without_any_opt_in(tmp_path):
    for name, model in [("cnn", TinyCNN()), ("branchy", Branchy())]:
        export_cnn(tmp_path / f"{name}.pt2", model=model.eval())
        with torch.no_grad():
            torch.testing.assert_close(teacher(f"export:{tmp_path / name}.pt2")(X), model(X))
    dims = {0: 2 * torch.export.Dim("b"), 2: 2 * torch.export.Dim("h", max=64)}
    shapes = torch.export.export(
        Shapes(),
        (torch.rand(4, 2, 8, 10),),
        dynamic_shapes=({**dims, 3: torch.export.Dim("w", min=4)},),
    )
    torch.export.save(shapes, str(tmp_path / "shapes.pt2"))
    x = torch.rand(6, 2, 12, 10)
    torch.testing.assert_close(teacher(f"export:{tmp_path / 'shapes.pt2'}")(x), Shapes()(x))


def test_every_aten_op_taking_a_file_name_is_refused():
    from kdplug_torch.program_check import IO_OPS

    takes_file = set()
    for schema in torch._C._jit_get_all_schemas():
        namespace, name = schema.name.split("::", 1)
        strings = [a.name for a in schema.arguments if str(a.type).startswith("str")]
        if namespace in ("aten", "prims") and any(
            word in arg for arg in strings for word in ("file", "path", "dir")
        ):
            takes_file.add(name)
    assert "from_file" in takes_file and takes_file <= IO_OPS


def test_export_with_a_fixed_batch_runs_in_chunks_and_says_so_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("kdplug"), "propagate", True)
    model = TinyCNN().eval()
    export_cnn(tmp_path / "fixed.pt2", dynamic=False, model=model)  # torch's default: batch 2
    with caplog.at_level(logging.INFO, logger="kdplug"):
        t = teacher(f"export:{tmp_path / 'fixed.pt2'}")
        with torch.no_grad():
            for rows in (5, 2, 1):
                torch.testing.assert_close(t(X[:rows]), model(X[:rows]))
    notes = [r.getMessage() for r in caplog.records if "rows per call" in r.getMessage()]
    assert notes == [
        f"export:{tmp_path / 'fixed.pt2'} takes exactly 2 rows per call: running "
        "it 2 rows at a time, the last call padded with zero rows whose outputs "
        "are dropped"
    ]


# -- TorchScript -------------------------------------------------------------------------------


class FileWriter(torch.nn.Module):
    """Writes MARKER-load when loaded (``__setstate__``) and MARKER-run when run, through
    ``torch.from_file(shared=True)`` then ``copy_``: a TorchScript program writing files."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        written = torch.from_file(self.marker + "-run", True, 2, dtype=torch.uint8)
        written.copy_(torch.tensor([104, 10], dtype=torch.uint8))
        return x.flatten(1)[:, :10] + written[0].float() * 0

    @torch.jit.export
    def __getstate__(self):
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        self.marker = state[0]
        written = torch.from_file(self.marker + "-load", True, 2, dtype=torch.uint8)
        written.copy_(torch.tensor([104, 10], dtype=torch.uint8))
        self.training = state[1] and bool(written[0] == 104)


def test_torchscript_runs_only_with_the_code_opt_in(tmp_path, digits_splits):
    marker = tmp_path / "marker"
    save_torchscript(FileWriter(str(marker)), tmp_path / "writer.ts")
    spec, data = f"torchscript:{tmp_path / 'writer.ts'}", digits_splits["labeled"]
    line = error_line(label(spec, data, tmp_path / "refused"))
    assert line == (
        f"Error: {spec}: {tmp_path / 'writer.ts'} is a TorchScript program: loading it runs its "
        "__setstate__ code and running it runs its forward, which can read and write any file; "
        "if you trust this file pass --allow-code, add allow_code=true to the teacher spec or "
        "set KDPLUG_ALLOW_CODE=1, or export the model with torch.export or to ONNX instead"
    )
    assert not list(tmp_path.glob("marker*")) and not (tmp_path / "refused").exists()
    result = label(spec, data, tmp_path / "trusted", "--allow-code")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "marker-load").exists() and (tmp_path / "marker-run").exists()
    # the flag trusts files for its own command only, also one that fails: a caller running
    # the CLI in its process (here CliRunner) is not left trusting the next command's files
    failed = label(spec, "disk:/nowhere", tmp_path / "failed", "--allow-code")
    assert failed.exit_code == 2 and os.environ["KDPLUG_ALLOW_CODE"] == ""
    unparsed = label(spec, data, tmp_path / "unparsed", "--allow-code", "--batch-size", "abc")
    assert unparsed.exit_code == 2 and os.environ["KDPLUG_ALLOW_CODE"] == ""
    assert error_line(label(spec, data, tmp_path / "again")).startswith(f"Error: {spec}: ")


def test_torchscript_opt_in_by_spec_or_environment(tmp_path, monkeypatch):
    model = TinyCNN().eval()
    save_torchscript(model, tmp_path / "cnn.ts")
    with pytest.raises(UsageError, match="is a TorchScript program"):
        teacher(f"torchscript:{tmp_path / 'cnn.ts'}")
    with torch.no_grad():
        torch.testing.assert_close(
            teacher(f"torchscript:{tmp_path / 'cnn.ts'},allow_code=true")(X), model(X)
        )
    monkeypatch.setenv("KDPLUG_ALLOW_CODE", "1")
    assert teacher(f"torchscript:{tmp_path / 'cnn.ts'}").classes is None


def test_every_command_trusting_pickles_can_trust_code():
    def commands(group, prefix=""):
        for name, command in group.commands.items():
            yield f"{prefix}{name}", command
            yield from commands(command, f"{prefix}{name} ") if hasattr(command, "commands") else ()

    flags = {
        name: {o for p in command.params for o in p.opts} for name, command in commands(build_cli())
    }
    pickle_commands = sorted(n for n, f in flags.items() if "--allow-pickle" in f)
    assert pickle_commands and all("--allow-code" in flags[n] for n in pickle_commands)


# -- ONNX --------------------------------------------------------------------------------------


def onnx_model(path, weight=None):
    """onnx_linear's ``Flatten -> Gemm`` graph with 10 classes, loaded back as a ModelProto."""
    import onnx

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 10)) if weight is None else weight
    onnx_linear(path, weight, np.zeros(10))
    return onnx.load(str(path))


@pytest.mark.parametrize("how", ["../outside.bin", "absolute", "symlink"])
def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path, how):
    import onnx
    from onnx.external_data_helper import set_external_data

    folder = tmp_path / "model"
    folder.mkdir()
    model = onnx_model(folder / "m.onnx")
    (tmp_path / "outside.bin").write_bytes(np.zeros(640, np.float32).tobytes())
    location = {"../outside.bin": "../outside.bin", "absolute": str(tmp_path / "outside.bin")}
    if how == "symlink":
        (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    weight = next(t for t in model.graph.initializer if t.name == "W")
    set_external_data(weight, location.get(how, "link.bin"), offset=0, length=2560)
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    onnx.save(model, str(folder / "m.onnx"))
    with pytest.raises(UsageError) as refused:
        teacher(f"onnx:{folder / 'm.onnx'}")
    message = str(refused.value)
    assert f"of {folder / 'm.onnx'} reads its data from " in message
    assert "outside the model's folder" in message and "\n" not in message


def test_onnx_external_data_next_to_the_model_loads(tmp_path):
    import onnx

    weight = np.random.default_rng(1).normal(size=(64, 10)).astype(np.float32)
    model = onnx_model(tmp_path / "m.onnx", weight)
    onnx.save(
        model,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    out = teacher(f"onnx:{tmp_path / 'm.onnx'}")(X)
    torch.testing.assert_close(out, X.flatten(1) @ torch.from_numpy(weight))


def test_onnx_custom_op_domain_is_refused(tmp_path):
    import onnx
    from onnx import helper

    model = onnx_model(tmp_path / "m.onnx")
    model.graph.node.append(helper.make_node("Spy", ["y"], ["seen"], domain="kdplug.test"))
    model.opset_import.append(helper.make_opsetid("kdplug.test", 1))
    onnx.save(model, str(tmp_path / "custom.onnx"))
    with pytest.raises(UsageError, match=r"the operator Spy of domain 'kdplug\.test'"):
        teacher(f"onnx:{tmp_path / 'custom.onnx'}")


def test_onnx_checks_need_the_onnx_package(tmp_path, monkeypatch):
    onnx_model(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(UsageError, match=r"need onnxruntime and onnx \(no module 'onnx'\)"):
        teacher(f"onnx:{tmp_path / 'm.onnx'}")


def test_onnx_fixed_batch_runs_in_chunks(tmp_path):
    import onnx

    weight = np.random.default_rng(2).normal(size=(64, 10)).astype(np.float32)
    model = onnx_model(tmp_path / "m.onnx", weight)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    t = teacher(f"onnx:{tmp_path / 'fixed.onnx'}")
    assert t.batch == 2
    torch.testing.assert_close(t(X), X.flatten(1) @ torch.from_numpy(weight))


# -- teacher options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, message",
    [
        ("size=-3", "option size must be N or H;W of sizes >= 1, got -3"),
        ("size=0", "option size must be N or H;W of sizes >= 1, got 0"),
        ("size=8;0", "option size must be N or H;W of sizes >= 1, got [8, 0]"),
        ("std=0", "std must be positive, got [0.0]"),
    ],
)
def test_bad_teacher_size_or_std_is_one_line_naming_the_teacher(tmp_path, option, message):
    export_cnn(tmp_path / "cnn.pt2")
    with pytest.raises(UsageError) as refused:
        teacher(f"export:{tmp_path / 'cnn.pt2'},{option}")
    assert str(refused.value) == f"export:{tmp_path / 'cnn.pt2'}: {message}"


@pytest.mark.parametrize(
    "option, value",
    [("mean", float("nan")), ("std", float("nan")), ("std", [0.2, float("inf"), 0.2])],
)
def test_teacher_mean_and_std_must_be_finite(option, value):
    from kdplug.teacher_io import preprocess

    options = {"mean": None, "std": None, option: value}
    with pytest.raises(UsageError, match=rf"^onnx:m\.onnx: option {option} must be finite numbers"):
        preprocess("onnx:m.onnx", None, options["mean"], options["std"], None)


def test_negative_size_through_the_cli_is_one_line(tmp_path, digits_splits):
    export_cnn(tmp_path / "cnn.pt2")
    spec = f"export:{tmp_path / 'cnn.pt2'},size=-3"
    line = error_line(label(spec, digits_splits["labeled"], tmp_path / "out"))
    assert (
        line == f"Error: {spec.split(',')[0]}: option size must be N or H;W of sizes >= 1, got -3"
    )
    assert not (tmp_path / "out").exists()
