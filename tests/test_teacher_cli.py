"""``kdplug teachers calibrate`` and ``report`` (the CLI, in this process), and their bad inputs."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdplug.plugins import get_manager
from tests.conftest import invoke_cli
from tests.teacher_fixtures import TinyCNN, digits_arrays, fit_logistic, save_torchscript

PNG = b"\x89PNG\r\n\x1a\n"


class TouchMarker:
    """Unpickling this creates a marker file: it stands for arbitrary code in a pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def files(digits_splits, tmp_path_factory):
    """Teachers for the labeled digits split (150 rows) and broken files, by name."""
    import joblib

    root = tmp_path_factory.mktemp("teachers")
    lr = fit_logistic(digits_splits["test"])
    x, y = digits_arrays(digits_splits["labeled"])
    flat = x.reshape(len(x), -1).numpy()
    log_probs = np.log(lr.predict_proba(flat)).astype(np.float32)
    np.save(root / "hot.npy", log_probs * 10)  # the same model, deliberately over-confident
    nan = log_probs.copy()
    nan[[3, 40], 0] = np.nan
    np.save(root / "nan.npy", nan)
    np.save(root / "three.npy", log_probs[:, :3])
    joblib.dump(lr, root / "lr.joblib")
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    save_torchscript(cnn, root / "cnn.ts")
    (root / "bad.ts").write_bytes(b"PK\x03\x04 this is not a TorchScript archive")
    (root / "bad.onnx").write_bytes(b"\x08\x07 not a protobuf model")
    (root / "bad.safetensors").write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{")
    with torch.no_grad():
        cnn_pred = cnn(x).argmax(1).numpy()
    paths = {p.name.replace(".", "_"): str(p) for p in root.iterdir()}
    paths.update(
        root=str(root),
        data=digits_splits["labeled"],
        labels=y.numpy(),
        lr_pred=lr.predict(flat),
        cnn_pred=cnn_pred,
    )
    return paths


def test_calibrate_then_report_with_figures(files, tmp_path):
    teachers = [f"logits:{files['hot_npy']}", f"sklearn:{files['lr_joblib']}"]
    teachers.append(f"torchscript:{files['cnn_ts']}")
    # the joblib (pickle) and TorchScript (code) teachers load because of the opt-ins
    args = [arg for spec in teachers for arg in ("--teacher", spec)]
    args += ["--allow-pickle", "--allow-code"]
    calib = tmp_path / "calib.json"
    before = {key: os.environ.get(key) for key in ("KDPLUG_ALLOW_PICKLE", "KDPLUG_ALLOW_CODE")}
    calibrated = invoke_cli("teachers", "calibrate", *args, "--data", files["data"], "--out", calib)
    assert calibrated.exit_code == 0, calibrated.output
    # the opt-ins do not outlive the command: later tests' files are not trusted
    assert {key: os.environ.get(key) for key in before} == before
    record = json.loads(calib.read_text())
    hot = record["teachers"][0]
    assert [e["spec"] for e in record["teachers"]] == teachers
    assert hot["fingerprint"].startswith("sha256:") and hot["temperature"] > 3
    assert hot["ece_after"] < hot["ece_before"] and hot["nll_after"] < hot["nll_before"]
    assert record["rows"] == 150

    out = tmp_path / "report"
    result = invoke_cli(
        "teachers", "report", *args, "--data", files["data"], "--calibration", calib,
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    labels = files["labels"]
    first, second, third = report["teachers"]
    assert first["accuracy"] == pytest.approx(np.mean(files["lr_pred"] == labels))
    assert second["accuracy"] == pytest.approx(first["accuracy"])
    assert first["calibrated"]["ece"] == pytest.approx(hot["ece_after"])
    assert first["calibrated"]["ece"] < first["ece"]
    agreement = np.array(report["agreement"])
    np.testing.assert_allclose(np.diag(agreement), 1.0)
    assert agreement[0, 1] == pytest.approx(1.0)
    assert agreement[0, 2] == pytest.approx(np.mean(files["lr_pred"] == files["cnn_pred"]))
    judged = {c["name"] for c in report["combiners"]} | {
        s["name"] for s in report["skipped_combiners"]
    }
    assert judged == set(get_manager().registries["combiners"].names())
    for name in ("agreement.png", "reliability-0.png", "reliability-1.png", "reliability-2.png"):
        assert (out / name).read_bytes().startswith(PNG)
    names = [Path(spec.split(":", 1)[1]).stem for spec in teachers]
    assert [t["name"] for t in report["teachers"]] == names  # file stems, not cut specs
    table = result.stdout.splitlines()
    assert "ECE after" in result.stdout and any(line.split()[1:2] == ["cnn"] for line in table)


def bad_input_cases():
    return [
        ("missing file", ["sklearn:{root}/absent.skops"], [], "no such file"),
        ("corrupt TorchScript", ["torchscript:{bad_ts}"], [], "cannot load .* as TorchScript"),
        ("corrupt ONNX", ["onnx:{bad_onnx}"], [], "as an ONNX model"),
        ("corrupt safetensors", ["logits:{bad_safetensors}"], [], "as safetensors"),
        (
            "no class overlap",
            ["logits:{hot_npy},classes=a;b;c;d;e;f;g;h;i;j"],
            [],
            r"shares no class with the data: teacher classes \['a', 'b'.* data classes \['0'",
        ),
        ("class count", ["logits:{three_npy}"], [], "predicts 3 classes but the data has 10"),
        ("NaN logits", ["logits:{nan_npy}"], [], r"nan\.npy returned NaN or Inf .* batch 0"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "teachers, extra, message",
    [case[1:] for case in bad_input_cases()],
    ids=[case[0] for case in bad_input_cases()],
)
def test_bad_input_is_one_line_and_exit_code_2(files, tmp_path, teachers, extra, message):
    import re

    args = [a for spec in teachers for a in ("--teacher", spec.format_map(files))]
    out = tmp_path / "out"
    extra = [a.format_map(files) for a in extra]
    result = invoke_cli("teachers", "report", *args, *extra, "--data", files["data"], "--out", out)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_skip_bad_rows_drops_and_counts_nan_rows(files):
    result = invoke_cli(
        "teachers", "report", "--teacher", f"logits:{files['nan_npy']}", "--data", files["data"],
        "--skip-bad-rows", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped_rows"] == 2 and report["rows"] == 148
    keep = np.ones(150, dtype=bool)
    keep[[3, 40]] = False
    expected = np.mean(files["lr_pred"][keep] == files["labels"][keep])
    assert report["teachers"][0]["accuracy"] == pytest.approx(expected)


def test_malicious_pickle_is_not_loaded_without_the_opt_in(files, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "model.pkl"
    evil.write_bytes(pickle.dumps(TouchMarker(marker)))
    base = ["teachers", "calibrate", "--teacher", f"sklearn:{evil}", "--data", files["data"]]
    base += ["--out", str(tmp_path / "calib.json")]
    monkeypatch.setenv("KDPLUG_ALLOW_PICKLE", "")
    refused = invoke_cli(*base)
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
    assert "runs any code" in refused.stderr and not marker.exists()
    assert not (tmp_path / "calib.json").exists()
    # test_teacher_sources shows the same payload does run once the opt-in is given


def test_combiner_scores_with_and_without_the_combiner_plugin(kdplug_manager):
    from kdplug.engines.teachers import combiner_scores, format_report

    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [0.0, 4.0, 0.0]]])
    known = torch.ones(2, 3, dtype=torch.bool)
    labels = torch.tensor([0, 1])
    results, skipped = combiner_scores(logits, known, labels, chunk=1)
    assert "mean" in {r["name"] for r in results}
    mean = next(r for r in results if r["name"] == "mean")
    probs = torch.softmax(logits, -1).mean(0)  # row 0: class 2 wins narrowly, row 1: class 1
    nll = -(probs[0, 0].log() + probs[1, 1].log()) / 2
    assert mean["accuracy"] == pytest.approx(0.5) and mean["nll"] == pytest.approx(float(nll))
    kdplug_manager.registries["combiners"].remove_plugin("combiners")
    assert combiner_scores(logits, known, labels, chunk=1) == ([], [])
    report = {
        "data": "d", "rows": 2, "skipped_rows": 0, "calibration": None, "combiners": [],
        "skipped_combiners": [], "agreement": [[1.0]],
        "teachers": [{"name": "t", "spec": "t", "accuracy": 1.0, "nll": 0.1, "ece": 0.05}],
    }  # fmt: skip
    assert "no combiner plugin is installed" in format_report(report)


def test_report_refuses_a_non_empty_out_directory(tmp_path):
    from kdplug import UsageError
    from kdplug.engines.teachers import report

    (tmp_path / "notes.txt").write_text("someone else's file")
    with pytest.raises(UsageError, match="is not empty; choose another --out or pass --overwrite"):
        report(["logits:unused.npy"], "disk:unused", out=str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "someone else's file"
