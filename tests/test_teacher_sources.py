"""Every teacher source on small artifacts made here: outputs match the model run directly."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdplug import UsageError
from kdplug.file_hashes import file_hash
from kdplug.ops import IMPOSSIBLE
from kdplug.plugins import create
from tests.teacher_fixtures import (
    TinyCNN,
    digits_arrays,
    fit_logistic,
    onnx_linear,
    save_torchscript,
)

torch.manual_seed(0)
X = torch.rand(6, 1, 8, 8)


def teacher(spec: str):
    return create("teachers", spec)


@pytest.fixture(scope="module")
def digits_lr(digits_splits):
    return fit_logistic(digits_splits["test"])


def test_plugins_import_no_heavy_library():
    code = (
        "import sys, kdplug_torch, kdplug_sklearn, kdplug_onnx\n"
        "heavy = [m for m in ('torch', 'sklearn', 'onnxruntime', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- torchscript / export -------------------------------------------------------------------


def test_torchscript_adapts_gray_small_images_for_an_rgb_model(tmp_path):
    model = TinyCNN(in_chans=3).eval()
    path = tmp_path / "cnn.ts"
    save_torchscript(model, path)
    t = teacher(
        f"torchscript:{path},size=16,mean=0.5;0.4;0.3,std=0.2;0.25;0.3,classes=0;1;2;3;4;5;6;7;8;9,"
        "allow_code=true"
    )
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    resized = F.interpolate(X.repeat(1, 3, 1, 1), size=(16, 16), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = model((resized - mean) / std)
        got = t(X)
    torch.testing.assert_close(got, expected)
    assert isinstance(t, torch.nn.Module) and t.classes == [str(i) for i in range(10)]
    assert t.fingerprint == file_hash(path)


def test_exported_program_takes_channels_and_size_from_its_input(tmp_path):
    model = TinyCNN(in_chans=3).eval()
    example = torch.rand(2, 3, 12, 12)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b")},))
    path = tmp_path / "cnn.pt2"
    torch.export.save(program, str(path))
    t = teacher(f"export:{path}")
    assert t.preprocess.in_chans == 3 and t.preprocess.size == (12, 12)
    t.to("cpu").eval()  # exported programs refuse eval(); the teacher must not pass it on
    resized = F.interpolate(X.repeat(1, 3, 1, 1), size=(12, 12), mode="bilinear", antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(t(X), model(resized))


def test_softmax_model_gives_log_probabilities_with_zeros_impossible(tmp_path):
    class ZeroLast(torch.nn.Module):
        def forward(self, x):
            z = x.flatten(1)[:, :3] * 4
            return torch.softmax(z.masked_fill(torch.tensor([False, False, True]), -torch.inf), -1)

    path = tmp_path / "probs.ts"
    save_torchscript(ZeroLast(), path)
    out = teacher(f"torchscript:{path},probs=true,allow_code=true")(X)
    expected = torch.log_softmax(X.flatten(1)[:, :2] * 4, -1)
    torch.testing.assert_close(out[:, :2], expected)
    assert (out[:, 2] == IMPOSSIBLE).all()


def rewrite_archive(src, dst, replace=None, add=None):
    """Copy a zip archive, replacing entries whose name contains a key, adding others."""
    import zipfile

    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info.filename)
            for key, value in (replace or {}).items():
                if key in info.filename:
                    data = value
            new.writestr(info, data)
        prefix = old.namelist()[0].split("/")[0]
        for name, value in (add or {}).items():
            new.writestr(f"{prefix}/{name}", value)


def test_exported_program_never_unpickles_without_the_opt_in(tmp_path, monkeypatch):
    import pickle

    model = TinyCNN().eval()
    program = torch.export.export(model, (torch.rand(2, 1, 8, 8),))
    torch.export.save(program, str(tmp_path / "good.pt2"))
    marker = tmp_path / "code-ran"
    # torch.export.load retries a failed weights-only load with full pickle
    payload = pickle.dumps(TouchMarker(marker), protocol=2)
    rewrite_archive(tmp_path / "good.pt2", tmp_path / "evil.pt2", {"sample_inputs": payload})
    monkeypatch.delenv("KDPLUG_ALLOW_PICKLE", raising=False)
    with pytest.raises(UsageError, match="only pickle can load.*runs any code.*--allow-pickle"):
        teacher(f"export:{tmp_path / 'evil.pt2'}")
    assert not marker.exists()
    with pytest.raises(UsageError, match="cannot load"):
        teacher(f"export:{tmp_path / 'evil.pt2'},allow_pickle=true")
    assert marker.exists()  # the opt-in is what stood between the file and its code
    # constants torch would unpickle: tests/test_model_file_safety.py


@pytest.mark.parametrize(
    "source, payload",
    [("torchscript", b"PK\x03\x04 definitely not a zip"), ("export", b"\x00" * 64)],
)
def test_corrupt_model_files_are_usage_errors(tmp_path, source, payload):
    path = tmp_path / ("bad.ts" if source == "torchscript" else "bad.pt2")
    path.write_bytes(payload)
    with pytest.raises(UsageError, match=rf"{source}:.*bad\.(ts|pt2).*corrupt"):
        teacher(f"{source}:{path}")


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        teacher(f"torchscript:{tmp_path / 'absent.ts'}")
    path = tmp_path / "cnn.ts"
    save_torchscript(TinyCNN(), path)
    with pytest.raises(UsageError, match="std must be positive"):
        teacher(f"torchscript:{path},std=0,allow_code=true")
    with pytest.raises(UsageError, match=f"torchscript:{path}: option mean='abc' must be float"):
        teacher(f"torchscript:{path},mean=abc,allow_code=true")
    with pytest.raises(UsageError, match="repeated names"):
        teacher(f"torchscript:{path},classes=a;a,allow_code=true")


# -- precomputed logits -----------------------------------------------------------------------


def test_npy_logits_are_served_by_row_index(tmp_path):
    array = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", array)
    t = teacher(f"logits:{tmp_path / 'z.npy'}")
    assert t.uses_row_index and t.num_rows == 20 and not t.probs
    out = t(torch.zeros(3, 5), torch.tensor([7, 0, 19]))
    torch.testing.assert_close(out, torch.from_numpy(array[[7, 0, 19]]))
    with pytest.raises(UsageError, match="has 20 rows but data row 20"):
        t(torch.zeros(1, 5), torch.tensor([20]))


def test_probabilities_are_detected_and_zeros_made_impossible(tmp_path):
    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=np.float32)
    np.save(tmp_path / "p.npy", probs)
    t = teacher(f"logits:{tmp_path / 'p.npy'}")
    assert t.probs
    out = t(torch.zeros(2, 1), torch.tensor([0, 1]))
    assert out[0, 2] == IMPOSSIBLE
    torch.testing.assert_close(out[1], torch.log(torch.tensor([0.2, 0.3, 0.5])))
    assert not teacher(f"logits:{tmp_path / 'p.npy'},probs=false").probs
    with pytest.raises(UsageError, match="probs must be auto, true or false"):
        teacher(f"logits:{tmp_path / 'p.npy'},probs=maybe")


def test_safetensors_logits_by_key(tmp_path):
    from safetensors.numpy import save_file

    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_file({"teacher_a": a, "teacher_b": -a}, str(tmp_path / "z.safetensors"))
    spec = f"logits:{tmp_path / 'z.safetensors'}"
    out = teacher(f"{spec},key=teacher_b")(torch.zeros(2, 1), torch.tensor([3, 1]))
    torch.testing.assert_close(out, torch.from_numpy(-a[[3, 1]]))
    with pytest.raises(UsageError, match=r"holds tensors \['teacher_a', 'teacher_b'\]"):
        teacher(spec)
    with pytest.raises(UsageError, match="no tensor 'c'"):
        teacher(f"{spec},key=c")


def test_parquet_and_saved_dataset_columns(tmp_path):
    import datasets

    rows = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    table = datasets.Dataset.from_dict({"id": list(range(5)), "logits": rows.tolist()})
    table.to_parquet(str(tmp_path / "z.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    index = torch.tensor([4, 2])
    for ref in (tmp_path / "z.parquet", tmp_path / "saved"):
        out = teacher(f"logits:{ref},column=logits,classes=x;y;z")(torch.zeros(2, 1), index)
        torch.testing.assert_close(out, torch.from_numpy(rows[[4, 2]]))
    assert teacher(f"logits:{tmp_path / 'saved'}").classes is None  # "logits" picked by name
    with pytest.raises(UsageError, match=r"no column 'probs' \(columns: \['id', 'logits'\]\)"):
        teacher(f"logits:{tmp_path / 'saved'},column=probs")
    with pytest.raises(UsageError, match="2 class names given but the file has 3 columns"):
        teacher(f"logits:{tmp_path / 'z.parquet'},classes=x;y")


def test_corrupt_logits_files(tmp_path):
    good = np.zeros((4, 3), dtype=np.float32)
    np.save(tmp_path / "cut.npy", good)
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) - 20])
    with pytest.raises(UsageError, match=r"cut\.npy as a \.npy array"):
        teacher(f"logits:{tmp_path / 'cut.npy'}")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(UsageError, match="object array"):
        teacher(f"logits:{tmp_path / 'objects.npy'}")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UsageError, match="as safetensors"):
        teacher(f"logits:{tmp_path / 'bad.safetensors'}")
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(UsageError, match=r"\[rows, classes\] array, got shape \(5,\)"):
        teacher(f"logits:{tmp_path / 'flat.npy'}")
    (tmp_path / "z.txt").write_text("1 2 3")
    with pytest.raises(UsageError, match="unknown file type '.txt'"):
        teacher(f"logits:{tmp_path / 'z.txt'}")


# -- scikit-learn -----------------------------------------------------------------------------


class TouchMarker:
    """A pickle payload: unpickling it creates a marker file (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_skops_estimator_gives_log_predict_proba(tmp_path, digits_splits, digits_lr):
    import skops.io

    skops.io.dump(digits_lr, tmp_path / "lr.skops")
    t = teacher(f"sklearn:{tmp_path / 'lr.skops'}")
    x, _ = digits_arrays(digits_splits["labeled"])
    expected = np.log(digits_lr.predict_proba(x.reshape(len(x), -1).numpy()))
    torch.testing.assert_close(t(x), torch.from_numpy(expected).float())
    assert t.classes == [str(c) for c in range(10)] and not isinstance(t, torch.nn.Module)
    with pytest.raises(UsageError, match="expects 64 features, the data gives 16"):
        t(torch.rand(2, 1, 4, 4))


def test_skops_refuses_untrusted_types_unless_trusted(tmp_path):
    import skops.io
    from sklearn.tree import DecisionTreeClassifier

    tree = DecisionTreeClassifier(max_depth=2).fit(np.eye(4), ["a", "b", "a", "c"])
    skops.io.dump(tree, tmp_path / "tree.skops")
    needed = skops.io.get_untrusted_types(file=tmp_path / "tree.skops")
    assert needed  # the Tree type is not trusted by default
    spec = f"sklearn:{tmp_path / 'tree.skops'}"
    with pytest.raises(UsageError, match=rf"trusted={needed[0]}"):
        teacher(spec)
    t = teacher(f"{spec},trusted={';'.join(needed)}")
    assert t.classes == ["a", "b", "c"]
    probs = tree.predict_proba(np.eye(4))
    out = t(torch.eye(4))
    assert torch.equal(out == IMPOSSIBLE, torch.from_numpy(probs == 0))


def test_decision_function_estimators_give_scores_as_logits(tmp_path):
    import skops.io
    from sklearn.linear_model import RidgeClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    multi = RidgeClassifier().fit(x, np.arange(30) % 3)
    binary = RidgeClassifier().fit(x, np.arange(30) % 2)
    for name, model in (("multi", multi), ("binary", binary)):
        skops.io.dump(model, tmp_path / f"{name}.skops")
    out = teacher(f"sklearn:{tmp_path / 'multi.skops'}")(torch.from_numpy(x))
    torch.testing.assert_close(out, torch.from_numpy(multi.decision_function(x)).float())
    out = teacher(f"sklearn:{tmp_path / 'binary.skops'}")(torch.from_numpy(x))
    scores = torch.from_numpy(binary.decision_function(x)).float()
    torch.testing.assert_close(out, torch.stack([torch.zeros_like(scores), scores], 1))


def test_pickle_needs_the_opt_in_and_is_not_executed_without_it(tmp_path, monkeypatch):
    import pickle

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(TouchMarker(marker)))
    monkeypatch.delenv("KDPLUG_ALLOW_PICKLE", raising=False)
    with pytest.raises(UsageError, match="runs any code.*--allow-pickle.*allow_pickle=true"):
        teacher(f"sklearn:{evil}")
    assert not marker.exists()
    # with the opt-in the file IS unpickled (its code runs): the opt-in is what guards it
    with pytest.raises(UsageError, match="holds a NoneType, not an estimator"):
        teacher(f"sklearn:{evil},allow_pickle=true")
    assert marker.exists()


def test_joblib_estimator_with_env_opt_in(tmp_path, monkeypatch, digits_lr):
    import joblib

    joblib.dump(digits_lr, tmp_path / "lr.joblib")
    monkeypatch.setenv("KDPLUG_ALLOW_PICKLE", "1")
    t = teacher(f"sklearn:{tmp_path / 'lr.joblib'},classes=a;b;c;d;e;f;g;h;i;j")
    assert t.classes == list("abcdefghij")
    x = torch.rand(3, 64)
    expected = np.log(digits_lr.predict_proba(x.numpy()))
    torch.testing.assert_close(t(x), torch.from_numpy(expected).float())


def test_corrupt_skops_and_unknown_suffix(tmp_path):
    (tmp_path / "bad.skops").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UsageError, match="as a skops file"):
        teacher(f"sklearn:{tmp_path / 'bad.skops'}")
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="unknown file type '.bin'"):
        teacher(f"sklearn:{tmp_path / 'model.bin'}")


# -- ONNX ---------------------------------------------------------------------------------------


def test_onnx_graph_matches_numpy(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(64, 10)), rng.normal(size=10)
    onnx_linear(tmp_path / "lin.onnx", weight, bias)
    t = teacher(f"onnx:{tmp_path / 'lin.onnx'},mean=0.5,std=0.5")
    assert t.preprocess.in_chans == 1 and t.preprocess.size == (8, 8)
    expected = ((X.numpy().reshape(6, 64) - 0.5) / 0.5) @ weight + bias
    torch.testing.assert_close(t(X), torch.from_numpy(expected).float(), rtol=1e-4, atol=1e-4)
    assert t.fingerprint == file_hash(tmp_path / "lin.onnx")


def test_onnx_softmax_output_is_log_probabilities(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(64, 3)), rng.normal(size=3)
    onnx_linear(tmp_path / "soft.onnx", weight, bias, softmax=True)
    out = teacher(f"onnx:{tmp_path / 'soft.onnx'},probs=true,classes=a;b;c")(X)
    expected = torch.log_softmax(torch.from_numpy(X.numpy().reshape(6, 64) @ weight + bias), -1)
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)


def test_onnx_corrupt_file_and_missing_runtime(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(UsageError, match=r"onnx:.*bad\.onnx.*as an ONNX model"):
        teacher(f"onnx:{tmp_path / 'bad.onnx'}")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'kdplug\[onnx\]'"):
        teacher(f"onnx:{tmp_path / 'bad.onnx'}")
