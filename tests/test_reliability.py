"""Reliability: bad input, interruption, full or read-only disks, plugin faults, untrusted
files, and docs/reliability.md's table of them (every test it names must exist)."""

import ast
import errno
import fnmatch
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kdplug.outputs
from kdplug import UsageError, ops
from kdplug.data import load_data
from kdplug.plugins import get_manager
from tests.conftest import run_cli

DEV_FULL = "/dev/full"
needs_dev_full = pytest.mark.skipif(
    not (os.path.exists(DEV_FULL) and stat.S_ISCHR(os.stat(DEV_FULL).st_mode)),
    reason="no /dev/full device",
)


def fail_writes(monkeypatch, patterns, after=0, how="full"):
    """Atomic writes of files whose names match ``patterns`` fail after the first ``after``.

    ``how="full"``: the temporary file is /dev/full, so the real writer meets the kernel's
    ENOSPC exactly as on a full disk. ``how="readonly"``: creating the temporary fails with
    EROFS, as on a read-only file system.
    """
    real = tempfile.mkdtemp
    seen = []

    def mkdtemp(suffix=None, prefix=None, dir=None):
        name = (prefix or "")[1:-1]  # atomic_path's prefix is ".NAME."
        matches = suffix == ".tmp" and any(fnmatch.fnmatch(name, p) for p in patterns)
        if matches:
            seen.append(name)
        if matches and len(seen) > after and how == "readonly":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        tmp = real(suffix=suffix, prefix=prefix, dir=dir)
        if matches and len(seen) > after:
            os.symlink(DEV_FULL, os.path.join(tmp, name))
        return tmp

    monkeypatch.setattr(kdplug.outputs.tempfile, "mkdtemp", mkdtemp)


def leftovers(directory):
    """Temporary files or directories an interrupted atomic write left behind."""
    return [p for p in directory.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def logits_teacher(digits_splits, tmp_path_factory):
    """A precomputed-logits teacher for the labeled digits split (150 rows, 10 classes)."""
    source = load_data(digits_splits["labeled"])
    x, y, _ = source.batch(list(range(len(source))))
    weight = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    logits = x.flatten(1) @ weight + 4 * torch.nn.functional.one_hot(y, 10)
    path = tmp_path_factory.mktemp("teacher") / "teacher.npy"
    np.save(path, logits.numpy().astype(np.float32))
    return str(path)


@needs_dev_full
def test_distill_on_a_full_then_read_only_disk_keeps_the_last_checkpoint(
    digits_splits, tmp_path, monkeypatch
):
    from kdplug.engines.distill import DistillConfig, distill

    out = tmp_path / "run"
    config = dict(
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        out=str(out),
        loss="ce",
        epochs=3,
        batch_size=50,
    )
    fail_writes(monkeypatch, ["checkpoint.pt"], after=1)  # the disk fills after epoch 1
    with pytest.raises(UsageError, match=r"^cannot write .*checkpoint\.pt: the disk is full$"):
        distill(DistillConfig(**config))
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["epoch"] == 1
    assert leftovers(out) == []

    fail_writes(monkeypatch, ["checkpoint.pt"], how="readonly")
    with pytest.raises(UsageError, match=r"checkpoint\.pt: the file system is read-only$"):
        distill(DistillConfig(**config, resume=True))
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["epoch"] == 1

    summary = distill(DistillConfig(**config, resume=True))
    assert summary["status"] == "finished" and len(summary["epoch_times_s"]) == 3


@needs_dev_full
def test_label_on_a_full_disk_keeps_finished_shards_and_resumes(
    logits_teacher, digits_splits, tmp_path, monkeypatch
):
    import datasets

    from kdplug.engines.label import LabelConfig, run_label
    from kdplug.shards import is_finished, plan_shards

    def config(out, **extra):
        return LabelConfig(
            teachers=[f"logits:{logits_teacher}"],
            data=digits_splits["labeled"],
            out=str(out),
            generator="threshold,tau=0.5",
            shard_size=50,
            progress=False,
            **extra,
        )

    out = tmp_path / "labels"
    fail_writes(monkeypatch, ["rows-*.safetensors"], after=1)
    with pytest.raises(
        UsageError, match=r"rows-0000000050-0000000100\.safetensors: the disk is full"
    ):
        run_label(config(out))
    monkeypatch.undo()
    finished = [is_finished(s) for s in plan_shards(150, 50, out / ".shards")]
    assert finished == [True, False, False] and leftovers(out) == []

    run_label(config(out, resume=True))
    run_label(config(tmp_path / "whole"))
    resumed, whole = (datasets.load_from_disk(str(p)) for p in (out, tmp_path / "whole"))
    assert resumed.to_dict() == whole.to_dict()


def run_with_file_size_limit(limit, *args):
    """``kdplug ARGS`` in a subprocess that may write no file larger than ``limit`` bytes.

    The write that crosses the limit is cut short and the next one fails (EFBIG), which is
    how a disk filling up mid-write behaves, unlike /dev/full's immediate ENOSPC.
    """
    import subprocess
    import sys

    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
        "from kdplug.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600
    )


def test_distill_when_the_disk_fills_mid_write_is_one_line(digits_splits, tmp_path):
    out = tmp_path / "run"
    result = run_with_file_size_limit(
        100_000,  # run.json fits, the checkpoint (student + optimizer state) does not
        *["distill", "--student", "timm:test_resnet", "--train", digits_splits["labeled"]],
        *["--loss", "ce", "--epochs", "1", "--batch-size", "50", "--out", str(out)],
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write {out / 'checkpoint.pt'}: File too large"
    )
    assert "Traceback" not in result.stderr
    assert not out.exists()  # no epoch finished: nothing to resume, so nothing is left


def test_cache_on_a_full_disk_keeps_its_shards_and_resumes(
    logits_teacher, digits_splits, tmp_path, monkeypatch
):
    from kdplug.engines.cache import CacheConfig, run_cache

    def config(out, **extra):
        return CacheConfig(
            teachers=[f"logits:{logits_teacher}"],
            data=[digits_splits["labeled"]],
            out=str(out),
            shard_size=50,
            progress=False,
            **extra,
        )

    def disk_full(fd, offset, length):  # what posix_fallocate says when the space is gone
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "store"
    # the split's arrays are memory maps; unreserved, a full disk kills the process (SIGBUS)
    monkeypatch.setattr(os, "posix_fallocate", disk_full, raising=False)
    with pytest.raises(UsageError, match=r"^cannot write .*split-0: the disk is full$"):
        run_cache(config(out))
    monkeypatch.undo()
    assert len(list((out / ".shards" / "split-0").glob("rows-*.safetensors"))) == 3
    assert leftovers(out) == []

    run_cache(config(out, resume=True))
    run_cache(config(tmp_path / "whole"))
    for array in sorted((tmp_path / "whole" / "split-0").iterdir()):
        assert (out / "split-0" / array.name).read_bytes() == array.read_bytes()


def test_a_run_failing_before_any_work_leaves_no_directory(tmp_path, digits_splits, logits_teacher):
    from kdplug.engines.label import LabelConfig, run_label

    bad = tmp_path / "nan.npy"
    logits = np.load(logits_teacher)
    logits[[3, 40], 0] = np.nan
    np.save(bad, logits)
    out = tmp_path / "labels"
    args = ["label", "--teacher", f"logits:{bad}", "--data", digits_splits["labeled"]]
    result = run_cli(*args, "--out", str(out))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [
        f"Error: teacher logits:{bad} returned NaN or Inf logits in batch 0 (rows [3, 40] of "
        "the batch); pass --skip-bad-rows to drop such rows and count them"
    ]
    assert "Traceback" not in result.stderr and not out.exists()
    # so the corrected command runs as a new run, without --overwrite
    config = LabelConfig([f"logits:{bad}"], digits_splits["labeled"], str(out), progress=False)
    config.skip_bad_rows = True
    assert run_label(config)["rows"] == 150


def test_only_run_directories_without_finished_work_are_discarded(tmp_path):
    from kdplug.outputs import discarding_unstarted_runs, prepare_out_dir, write_json

    options = dict(resume=False, overwrite=False, marker="run.json", config={"a": 1})
    kept = prepare_out_dir(tmp_path / "before", **options)  # started outside the block
    with pytest.raises(UsageError, match="failed"), discarding_unstarted_runs():
        empty = prepare_out_dir(tmp_path / "empty", **options)
        (empty / ".shards").mkdir()
        outer = prepare_out_dir(tmp_path / "outer", **options)
        inner = prepare_out_dir(outer / "round-1" / "labels", **options)
        worked = prepare_out_dir(tmp_path / "worked", **options)
        write_json(worked / ".shards" / "rows-0-50.json", {})
        resumed = prepare_out_dir(tmp_path / "worked", **{**options, "resume": True})
        assert resumed == worked
        raise UsageError("failed")
    assert not empty.exists() and not inner.exists() and not outer.exists()
    assert (worked / "run.json").exists() and (worked / ".shards" / "rows-0-50.json").exists()
    assert (kept / "run.json").exists()
    with discarding_unstarted_runs():  # a block that succeeds leaves its runs alone
        done = prepare_out_dir(tmp_path / "done", **options)
    assert (done / "run.json").exists()


def test_a_python_caller_gets_the_same_cleanup_as_the_cli(digits_splits, tmp_path):
    from kdplug.engines.label import LabelConfig, run_label

    bad = tmp_path / "nan.npy"
    logits = np.zeros((150, 10), dtype=np.float32)
    logits[3] = np.nan
    np.save(bad, logits)
    out = tmp_path / "labels"
    config = LabelConfig([f"logits:{bad}"], digits_splits["labeled"], str(out), progress=False)
    with pytest.raises(UsageError, match="returned NaN or Inf"):
        run_label(config)
    assert not out.exists()


def test_self_train_round_data_is_written_whole_or_not_at_all(digits_splits, tmp_path, monkeypatch):
    import datasets

    from kdplug.engines.self_train import write_round_data

    source = load_data(digits_splits["labeled"])
    out = tmp_path / "pseudo"
    real_save = datasets.Dataset.save_to_disk

    def killed_midway(self, path, **kwargs):
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise KeyboardInterrupt  # stands for the process being killed here

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        write_round_data(source, np.arange(10), out, digits_splits["labeled"])
    assert not out.exists() and leftovers(tmp_path) == []  # --resume writes it again
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    assert write_round_data(source, np.arange(10), out, digits_splits["labeled"]).ref == str(out)
    assert len(datasets.load_from_disk(str(out))) == 10


def test_a_directory_replace_killed_between_its_renames_is_undone(tmp_path):
    from kdplug.outputs import atomic_path, prepare_out_dir, write_json

    options = dict(overwrite=False, marker="run.json", config={"a": 1})
    out = prepare_out_dir(tmp_path / "run", resume=False, **options)
    write_json(out / "shard.json", {"rows": 50})
    # atomic_path replaces a directory by two renames: out -> .out.old, then tmp -> out
    os.replace(out, tmp_path / ".run.old")  # ... and the process is killed in between
    assert prepare_out_dir(tmp_path / "run", resume=True, **options) == out
    assert (out / "shard.json").exists() and not (tmp_path / ".run.old").exists()
    os.replace(out, tmp_path / ".run.old")
    with atomic_path(out, directory=True) as tmp:
        write_json(tmp / "report.json", {})
    assert sorted(os.listdir(out)) == ["report.json"] and leftovers(tmp_path) == []


def test_data_without_a_label_column_names_the_columns_it_has(tmp_path, logits_teacher):
    import datasets
    import timm

    from kdplug.engines.cache import CacheConfig, run_cache
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.eval import evaluate_student
    from kdplug.engines.label import LabelConfig, run_label
    from kdplug.engines.teachers import report
    from kdplug.model_dir import save_student

    data = tmp_path / "images"
    datasets.Dataset.from_dict({"image": [np.zeros((8, 8), np.uint8)] * 4}).save_to_disk(str(data))
    data, teacher, out = f"disk:{data}", f"logits:{logits_teacher}", str(tmp_path / "out")
    student = tmp_path / "student"
    model = timm.create_model("test_resnet", num_classes=2, in_chans=1)
    save_student(
        student, model, architecture="test_resnet", classes=["a", "b"], input_size=[1, 8, 8],
        mean=[0.5], std=[0.5],
    )  # fmt: skip
    needs_labels = {
        "label": lambda: run_label(LabelConfig([teacher], data, out)),
        "cache": lambda: run_cache(CacheConfig([teacher], [data], out)),
        "distill": lambda: distill(
            DistillConfig(student="timm:test_resnet", train=data, out=out, loss="ce")
        ),
        "teachers report": lambda: report([teacher], data),
        "eval": lambda: evaluate_student(str(student), data),
    }
    for command, run in needs_labels.items():
        with pytest.raises(UsageError, match=r"label column.*\(.*columns: \['image'\]\)"):
            run()
        assert not os.path.exists(out), command


FAULTY_PLUGIN = """
    import kdplug

    def boom():
        '''A combiner whose factory has a bug.'''
        return 1 / 0

    @kdplug.hookimpl
    def register_combiners(register):
        register("boom", boom)

    @kdplug.hookimpl
    def on_labels_written(run, path, report):
        raise RuntimeError("listener bug")
"""


def test_a_faulty_plugin_is_named_and_the_others_keep_working(
    logits_teacher, digits_splits, tmp_path
):
    from tests.test_core_plugins import fake_distribution

    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "kdplug-faulty", "kdplug_faulty", FAULTY_PLUGIN, "faulty")
    env = {"PYTHONPATH": str(site)}
    out = tmp_path / "labels"
    args = ["label", "--teacher", f"logits:{logits_teacher}", "--data", digits_splits["labeled"]]
    args += ["--out", str(out)]
    broken = run_cli(*args, "--combiner", "boom", env=env)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines() == [
        "Error: plugin 'faulty' failed to build combiner 'boom': "
        "ZeroDivisionError: division by zero"
    ]
    assert not out.exists()
    working = run_cli(*args, env=env)  # the mean combiner of another plugin; the hook fails
    assert working.returncode == 0, working.stderr
    assert (
        "kdplug: WARNING: plugin 'faulty' raised in on_labels_written: RuntimeError: listener bug"
        in working.stderr.splitlines()
    )
    assert (out / "report.json").exists()


# calls that can unpickle (run code from a file); each call site is covered by a test that it
# is only reached with the opt-in (tests/test_teacher_sources.py, tests/test_teacher_cli.py)
PICKLE_LOADERS = {
    "joblib.load": {"plugins/kdplug_sklearn/estimator.py"},
    # inside weights_only_loads()
    "torch.export.load": {"plugins/kdplug_torch/models.py", "kdplug/engines/export.py"},
    "pickle.load": set(),
    "pickle.loads": set(),
    "dill.load": set(),
    "cloudpickle.load": set(),
    "pd.read_pickle": set(),
    "pandas.read_pickle": set(),
}


def dotted(node):
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def test_no_code_loads_a_pickle_or_full_torch_checkpoint_unguarded():
    root = Path(__file__).resolve().parents[1]
    problems = []
    for file in sorted([*root.glob("kdplug/**/*.py"), *root.glob("plugins/**/*.py")]):
        where = file.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func)
            given = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if name == "torch.load" and given.get("weights_only") is not True:
                problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if name == "load_state_dict" and given.get("weights_only") is not True:
                problems.append(f"{where}:{node.lineno}: timm load_state_dict, weights_only")
            if name in ("np.load", "numpy.load") and given.get("allow_pickle") is not False:
                problems.append(f"{where}:{node.lineno}: np.load without allow_pickle=False")
            if name in PICKLE_LOADERS and where not in PICKLE_LOADERS[name]:
                problems.append(f"{where}:{node.lineno}: {name} (needs the pickle opt-in)")
    assert problems == []


def test_run_records_hold_the_teacher_file_hashes_and_data_fingerprints(
    logits_teacher, digits_splits, tmp_path
):
    import json

    from kdplug.engines.cache import CacheConfig, run_cache
    from kdplug.engines.label import LabelConfig, run_label
    from kdplug.engines.teachers import calibrate, report
    from kdplug.file_hashes import file_hash

    data, teacher = digits_splits["labeled"], f"logits:{logits_teacher}"
    digest, fingerprint = file_hash(logits_teacher), load_data(data).fingerprint
    assert digest.startswith("sha256:") and fingerprint
    run_label(LabelConfig([teacher], data, str(tmp_path / "labels"), progress=False))
    run_cache(CacheConfig([teacher], [data], str(tmp_path / "store"), progress=False))
    report([teacher], data, out=str(tmp_path / "report"))
    calibrate([teacher], data, str(tmp_path / "calibration.json"))
    labels, store, judged, calibration = (
        json.loads((tmp_path / name).read_text())
        for name in (
            "labels/report.json",
            "store/store.json",
            "report/report.json",
            "calibration.json",
        )
    )
    assert [t["fingerprint"] for t in labels["teachers"]] == [digest]
    assert labels["data"]["fingerprint"] == fingerprint
    assert [t["fingerprint"] for t in store["teachers"]] == [digest]
    assert store["teachers"][0]["files"] == {logits_teacher: digest}
    assert [s["fingerprint"] for s in store["splits"]] == [fingerprint]
    assert [t["fingerprint"] for t in judged["teachers"]] == [digest]
    assert judged["data_fingerprint"] == fingerprint
    assert [t["fingerprint"] for t in calibration["teachers"]] == [digest]
    assert calibration["data_fingerprint"] == fingerprint


GENERATORS = get_manager().registries["label-generators"].names()
# generators that keep every row, so no threshold of theirs can be crossed
KEEP_EVERY_ROW = {"soft", "topk"}
EXTREME = st.sampled_from([-1e4, 0.0, 1e4])


@st.composite
def engine_inputs(draw):
    """(target [N, C], teacher_probs [K, N, C], known [K, C]) made as the label engine makes
    them: teacher logits (arbitrary, all equal, or ±1e4), some classes unknown to a teacher,
    the mean combiner's target."""
    K, N, C = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(2, 5))
    mode = draw(st.sampled_from(["any", "equal", "extreme"]))
    if mode == "equal":
        z = np.full((K, N, C), draw(EXTREME), dtype=np.float32)
    else:
        elements = st.sampled_from([-1e4, 1e4]) if mode == "extreme" else st.floats(-1e4, 1e4)
        z = draw(arrays(np.float32, (K, N, C), elements=elements))
    known = draw(arrays(np.bool_, (K, C)))
    for k in range(K):
        known[k, draw(st.integers(0, C - 1))] = True
    logits, known = torch.tensor(z), torch.tensor(known)
    unlabeled = torch.full((N,), -1)
    _, target = get_manager().create("combiners", "mean")(logits, known, unlabeled, 1.0)
    return target, ops.teacher_probs(logits, known), known


def test_every_generator_with_a_threshold_has_the_threshold_property():
    from tests.test_generators import THRESHOLDED

    covered = {spec.split(",")[0] for spec, _ in THRESHOLDED}
    assert covered | KEEP_EVERY_ROW == set(GENERATORS)


@pytest.mark.parametrize("name", GENERATORS)
@settings(max_examples=30, deadline=None)
@given(inputs=engine_inputs())
def test_every_generator_gives_finite_distributions_on_extreme_logits(name, inputs):
    target, probs, known = inputs
    K, N, C = probs.shape
    spec = "agreement,min_agree=1" if name == "agreement" else name  # default: a majority of 3
    out = get_manager().create("label-generators", spec)(target, probs, known)
    assert torch.isfinite(out.probs).all() and (out.probs >= 0).all()
    torch.testing.assert_close(out.probs.sum(1), torch.ones(N), atol=1e-4, rtol=0)
    assert torch.equal(out.label >= 0, out.accepted) and (out.label < C).all()
    if name in KEEP_EVERY_ROW:
        assert out.accepted.all()


TEACHER_FILES = ["torchscript:{}", "export:{}", "onnx:{}", "logits:{}", "sklearn:{}", "kdplug:{}"]
TEACHER_FILES += ["timm:test_resnet,checkpoint={}", "store:{}"]


@pytest.mark.parametrize("spec", TEACHER_FILES)
def test_a_teacher_file_that_cannot_be_read_is_a_usage_error(spec, tmp_path):
    # a directory where the file should be: what root (CI) cannot be denied reading
    with pytest.raises(UsageError, match=str(tmp_path)):
        get_manager().create("teachers", spec.format(tmp_path))


def test_a_file_without_read_permission_is_a_usage_error(logits_teacher, digits_splits, tmp_path):
    from kdplug.engines.label import LabelConfig, run_label

    locked = tmp_path / "locked.npy"
    shutil.copy(logits_teacher, locked)
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root with CAP_DAC_OVERRIDE (as in CI)
        pytest.skip("this user reads and writes files whatever their mode")
    with pytest.raises(UsageError, match="Permission denied"):
        get_manager().create("teachers", f"logits:{locked}")
    out = tmp_path / "readonly"
    out.mkdir(mode=0o500)
    config = LabelConfig([f"logits:{logits_teacher}"], digits_splits["labeled"], str(out / "o"))
    with pytest.raises(UsageError, match="permission denied"):
        run_label(config)


def test_cache_and_self_train_leave_an_out_holding_something_else_alone(
    logits_teacher, digits_splits, tmp_path
):
    from kdplug.engines.cache import CacheConfig, run_cache
    from kdplug.engines.self_train import SelfTrainConfig, self_train

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data, teacher = digits_splits["labeled"], f"logits:{logits_teacher}"
    runs = [
        lambda: run_cache(CacheConfig([teacher], [data], str(out))),
        lambda: self_train(
            SelfTrainConfig([teacher], "timm:test_resnet", data, data, data, str(out))
        ),
    ]
    for run in runs:
        with pytest.raises(UsageError, match="is not a kdplug run directory of this kind"):
            run()
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_every_test_named_in_docs_reliability_exists():
    import re

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", page))
    assert len(named) > 60
    missing = []
    for file, name in sorted(named):
        path = root / file
        defined = path.exists() and re.search(rf"^def {name}\(", path.read_text(), re.M)
        if not defined:
            missing.append(f"{file}::{name}")
    assert missing == []


def test_inf_logits_name_the_teacher_and_batch_or_are_counted_as_bad_rows(
    logits_teacher, digits_splits, tmp_path
):
    from kdplug.data import batches
    from kdplug.teachers import build_teacher_set

    logits = np.load(logits_teacher)
    logits[60, 2], logits[75, 0] = np.inf, -np.inf  # both in the second batch of 50
    path = tmp_path / "inf.npy"
    np.save(path, logits)
    source = load_data(digits_splits["labeled"])
    spec = f"logits:{path}"
    strict = build_teacher_set([spec], source.classes)
    with pytest.raises(UsageError, match=r"inf\.npy returned NaN or Inf logits in batch 1 "):
        for x, _, idx in batches(source, 50):
            strict(x, idx)
    lenient = build_teacher_set([spec], source.classes, skip_bad_rows=True)
    bad = [lenient(x, idx).bad_rows for x, _, idx in batches(source, 50)]
    assert bad[0] is None and bad[2] is None
    assert bad[1].nonzero().flatten().tolist() == [10, 25]
