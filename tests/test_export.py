"""``kdplug export``: the student as ONNX, TorchScript or a torch.export program, on [0, 1]
images of any batch and image size (resize and normalization inside), checked by running
the file; here run again by each runtime directly against the student on other rows."""

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from kdplug.cli import build_cli
from tests.test_run_dirs import error_line

CLASSES = [str(i) for i in range(10)]


def invoke(*args):
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_splits):
    """A distill-like run directory: a test_resnet student on 12 x 12 inputs (the 8 x 8
    digits are resized inside the export), random BN statistics, and a summary.json that
    names its val data."""
    import timm

    from kdplug.model_dir import save_student

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("export-run")
    options = dict(classes=CLASSES, input_size=[1, 12, 12], mean=[0.3], std=[0.4])
    save_student(root / "student", model, architecture="test_resnet", **options)
    summary = {"data": {"train": None, "val": {"spec": digits_splits["test"]}}}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def _rows(spec, start, count):
    from kdplug.data import load_data

    x, _, _ = load_data(spec).batch(list(range(start, start + count)))
    return x


def _runtime(fmt, path):
    """The exported file loaded by its own runtime, and the student config it carries."""
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.shape for i in session.get_inputs()] == [["batch", 1, "height", "width"]]
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        run = lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        return run, props["kdplug_config"]
    files = {"config.json": ""}
    if fmt == "torchscript":
        return torch.jit.load(str(path), _extra_files=files), files["config.json"].decode()
    return torch.export.load(str(path), extra_files=files).module(), files["config.json"]


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("onnx", "onnx"), ("torchscript", "ts"), ("export", "pt2")]
)
def test_the_exported_file_runs_like_the_student(fmt, suffix, run_dir, digits_splits, tmp_path):
    import torch.nn.functional as F

    from kdplug.model_dir import load_classifier

    out = tmp_path / f"student.{suffix}"
    data = digits_splits["test"]
    result = invoke("export", "--model", run_dir, "--format", fmt, "--out", out,
                    "--data", data, "--rows", 6)  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == fmt and summary["file"] == str(out)
    assert summary["rows_checked"] == 6 and summary["max_abs_diff"] <= 1e-4
    assert summary["rows"] == f"the first 6 rows of {data} (--data)"
    assert summary["checked_shapes"] == [[6, 1, 8, 8], [1, 1, 8, 8], [3, 1, 13, 11]]
    assert summary["input"]["shape"] == ["batch", 1, "height", "width"]
    assert summary["output"]["shape"] == ["batch", 10] and summary["classes"] == CLASSES
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left

    run, carried = _runtime(fmt, out)
    assert carried == (run_dir / "student" / "config.json").read_text()
    student = load_classifier(run_dir)
    x = _rows(data, 100, 5)  # rows the export's own check did not see
    with torch.no_grad():
        for images in (x, x[:2], F.interpolate(x, size=(20, 17), mode="bilinear")):
            expected = student(images)
            assert expected.std() > 0.01  # logits that differ between rows and classes
            torch.testing.assert_close(run(images), expected, atol=1e-4, rtol=0)


def test_by_default_the_check_uses_the_runs_own_data_and_the_suffix_names_the_format(
    run_dir, digits_splits, tmp_path, caplog
):
    out = tmp_path / "student.ts"
    logger = logging.getLogger("kdplug")  # it may not propagate to the root logger
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="kdplug")
    try:
        result = invoke("export", "--model", run_dir / "student", "--out", out, "--rows", 3)
    finally:
        logger.removeHandler(caplog.handler)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "torchscript" and out.is_file()
    where = f"the run's val data, from {run_dir / 'summary.json'}"
    assert summary["rows"] == f"the first 3 rows of {digits_splits['test']} ({where})"
    assert f"--format torchscript (from the suffix of {out})" in caplog.text


def test_an_export_off_by_more_than_the_tolerance_is_refused_and_not_written(
    run_dir, digits_splits, tmp_path, monkeypatch
):
    import kdplug.engines.export

    monkeypatch.setattr(kdplug.engines.export, "TOLERANCE", -1.0)  # any difference is too much
    out = tmp_path / "student.ts"
    result = invoke("export", "--model", run_dir, "--out", out, "--data", digits_splits["test"],
                    "--rows", 2)  # fmt: skip
    assert result.exit_code == 2
    data = digits_splits["test"]
    assert error_line(result) == (
        f"Error: the torchscript export of {run_dir} gives logits 0 away from the student's "
        f"(more than -1) on the first 2 rows of {data} (--data); nothing written; try another "
        "--format"
    )
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_without_rows_to_check_on(run_dir, tmp_path):
    lone = tmp_path / "lone"
    (lone).mkdir()
    for name in ("config.json", "model.safetensors"):
        (lone / name).write_bytes((run_dir / "student" / name).read_bytes())
    result = invoke("export", "--model", lone, "--out", tmp_path / "s.onnx")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: {lone} is not in a distill run directory whose summary.json names its data: "
        "give --data DATA, rows the student reads, to check the export on"
    )
    result = invoke("export", "--model", lone, "--out", tmp_path / "s.bin")
    assert error_line(result) == (
        f"Error: --out {tmp_path / 's.bin'}: give --format onnx|torchscript|export (suffixes: "
        ".onnx (onnx), .ts (torchscript), .torchscript (torchscript), .pt2 (export))"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone"]


def test_a_tabular_student_exports_as_feature_rows_with_its_normalization(tmp_path):
    """A tabular:mlp student directory (its feature normalization fitted and saved with it)
    as a torch.export program: [batch, D] float32 rows in, logits out, like the student."""
    from kdplug.model_dir import load_classifier, save_student
    from kdplug.plugins import create

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=generator) * torch.tensor([1.0, 10.0, 100.0, 0.1]) + 5
    model = create("students", "tabular:mlp,widths=8,dropout=0.0", 3, 4)
    model.fit_inputs(x)
    features = ["a", "b", "c", "d"]
    fields = {"student": "tabular", "data_kind": "tabular", "feature_names": features}
    options = dict(input_size=[4], mean=None, std=None, model_args=model.model_args)
    save_student(tmp_path / "mlp", model.eval(), architecture="mlp", classes=["x", "y", "z"],
                 fields=fields, **options)  # fmt: skip
    csv = tmp_path / "rows.csv"
    lines = [",".join([*features, "label"])]
    lines += [",".join([*(f"{v:.6f}" for v in row.tolist()), "x"]) for row in x]
    csv.write_text("\n".join(lines) + "\n")

    out = tmp_path / "mlp.pt2"
    result = invoke("export", "--model", tmp_path / "mlp", "--out", out, "--data", f"csv:{csv}")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["input"]["shape"] == ["batch", 4] and summary["rows_checked"] == 12
    assert summary["checked_shapes"] == [[12, 4], [1, 4]]
    assert summary["preprocessing_included"] == "the model's own"

    program = torch.export.load(str(out)).module()
    rows = torch.randn(5, 4, generator=generator) * 50
    with torch.no_grad():
        expected = load_classifier(tmp_path / "mlp")(rows)
        torch.testing.assert_close(program(rows), expected, atol=1e-4, rtol=0)
