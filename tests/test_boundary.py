"""The CLI's boundary: every failure is one line with its exit code (1 for a bug, naming
the plugin; 2 for bad input; 130 for Ctrl-C), and a plugin's output is checked where an
engine takes it (NaN or negative probabilities, a bad store, calibration or student file)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kdplug
from kdplug.cli import KdplugGroup, build_cli
from kdplug.components import Labels
from kdplug.plugins import create


class Faulty:
    """Components that fail while running (not when built), each in its own way."""

    @kdplug.hookimpl
    def register_teachers(self, register):
        def raising(ref: str):
            """A teacher that raises on its first batch."""

            def teacher(x):
                raise ValueError(f"teacher bug in {ref}")

            return teacher

        def exiting(ref: str):
            """A teacher that calls sys.exit."""

            def teacher(x):
                sys.exit(0)

            return teacher

        def refusing(ref: str):
            """A teacher that refuses the data (a kdplug error)."""

            def teacher(x):
                raise kdplug.UsageError(f"refusing:{ref} cannot read rows of {x.shape[1]} values")

            return teacher

        def twins(ref: str):
            """A teacher whose class names repeat one."""

            def teacher(x):
                return x[:, :3]

            teacher.classes = ["a", "b", "a"]
            return teacher

        register("twins", twins)
        register("raising", raising)
        register("exiting", exiting)
        register("refusing", refusing)

    @kdplug.hookimpl
    def register_combiners(self, register):
        def broken(how: str = "raise"):
            """A combiner that raises, or returns NaN or negative probabilities."""

            def combine(logits, known, labels, temperature=1.0):
                if how == "raise":
                    raise ZeroDivisionError("division by zero")
                weights = torch.full(logits.shape[:2], 1.0 / logits.shape[0])
                target = torch.softmax(logits.mean(0), -1)
                target[1::7] = float("nan") if how == "nan" else -0.5
                return weights, target

            return combine

        register("broken", broken)

    @kdplug.hookimpl
    def register_label_generators(self, register):
        def wrong(how: str = "raise"):
            """A label generator that raises, returns NaN probabilities or exits."""

            def generate(target, teacher_probs, known):
                if how == "raise":
                    raise KeyError("generator bug")
                if how == "exit":
                    raise SystemExit(3)
                probs = target.clone()
                probs[4] = float("nan")
                return Labels(target.argmax(1), torch.ones(len(target), dtype=bool), probs)

            return generate

        register("wrong", wrong)


@pytest.fixture
def faulty(register_plugin):
    info = register_plugin(Faulty(), "faulty")
    assert info.error is None, info.error
    return "faulty"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A labeled tabular CSV (30 rows, 4 features, classes a/b/c) and a logits teacher."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).round(3)
    y = np.array(["a", "b", "c"] * 10)
    lines = ["f0,f1,f2,f3,label"] + [",".join([*map(str, r), c]) for r, c in zip(x, y)]
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    np.save(root / "logits.npy", rng.normal(size=(30, 3)).astype(np.float32))
    return {"data": f"csv:{root / 'data.csv'}", "teacher": f"logits:{root / 'logits.npy'}"}


def invoke(*args):
    """Run the kdplug CLI in this process; returns click's result (stdout and stderr)."""
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


def label(tiny, out, *extra):
    return invoke("label", "--data", tiny["data"], "--out", out, *extra)


def line_of(text):
    """The number of the line of this file that holds ``text``."""
    lines = Path(__file__).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def errors(result):
    """The ``Error:`` lines of a click result or a finished process (progress bars aside)."""
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in lines if line.startswith("Error:")]


def make_group():
    """A kdplug CLI group with commands that end in each way a command can end."""

    @click.group(cls=KdplugGroup)
    def group():
        pass

    @group.command()
    def unguarded():
        """Runs a plugin's teacher outside any engine: its bug reaches the boundary."""
        create("teachers", "raising:x")(torch.zeros(2, 4))

    @group.command()
    @click.option("--resume", is_flag=True)
    def resumable(resume):
        raise KeyboardInterrupt

    @group.command()
    def once():
        raise KeyboardInterrupt

    @group.command()
    @click.argument("code", type=int)
    def leave(code):
        if code < 0:
            raise click.Abort
        click.get_current_context().exit(code)

    return group


def test_an_unexpected_exception_is_one_line_naming_the_plugin_and_place(faulty, monkeypatch):
    group, runner = make_group(), CliRunner()
    result = runner.invoke(group, ["unguarded"])
    line = line_of('raise ValueError(f"teacher bug')
    assert result.exit_code == 1
    assert errors(result) == [
        "Error: ValueError: teacher bug in x (raised in plugin 'faulty' at "
        f"test_boundary.py:{line}; set KDPLUG_DEBUG=1 for the traceback)"
    ]
    assert runner.invoke(group, ["resumable"]).exit_code == 130
    assert errors(runner.invoke(group, ["resumable"])) == [
        "Error: interrupted; run the same command with --resume to continue"
    ]
    assert errors(runner.invoke(group, ["once"])) == [
        "Error: interrupted; run the same command again"
    ]
    # click's own ends are untouched
    assert runner.invoke(group, ["leave", "3"]).exit_code == 3
    aborted = runner.invoke(group, ["leave", "--", "-1"])
    assert aborted.exit_code == 1 and "Aborted!" in aborted.stderr
    missing = runner.invoke(group, ["leave"])
    assert missing.exit_code == 2 and "Missing argument 'CODE'" in missing.stderr
    monkeypatch.setenv("KDPLUG_DEBUG", "1")
    debug = runner.invoke(group, ["unguarded"])
    assert isinstance(debug.exception, ValueError) and "Error:" not in debug.stderr


def test_plugin_components_failing_while_running_are_named(faulty, tiny, tmp_path):
    out = tmp_path / "labels"
    teacher = ["--teacher", tiny["teacher"]]
    cases = {
        "raising:x": "plugin 'faulty' failed in teacher 'raising:x' on batch 0: "
        "ValueError: teacher bug in x",
        "exiting:x": "plugin 'faulty' failed in teacher 'exiting:x' on batch 0: sys.exit(0)",
    }
    for spec, message in cases.items():
        result = label(tiny, out, "--teacher", spec)
        assert result.exit_code == 1 and errors(result) == [f"Error: {message}"]
        assert not out.exists()  # so the corrected command runs as a new run
    result = label(tiny, out, *teacher, "--combiner", "broken")
    assert result.exit_code == 1 and errors(result) == [
        "Error: plugin 'faulty' failed in combiner 'broken' on batch 0: "
        "ZeroDivisionError: division by zero"
    ]
    assert not out.exists()
    # the generator decides after every shard is written: those are kept for --resume
    cases = {
        "wrong": "plugin 'faulty' failed in label generator 'wrong': KeyError: 'generator bug'",
        "wrong,how=exit": "plugin 'faulty' failed in label generator 'wrong,how=exit': sys.exit(3)",
    }
    for spec, message in cases.items():
        result = label(tiny, out, *teacher, "--generator", spec, "--resume")
        assert result.exit_code == 1 and errors(result) == [f"Error: {message}"]
        assert (out / ".shards").is_dir() and not (out / "report.json").exists()
    assert label(tiny, out, *teacher, "--resume").exit_code == 0
    # a kdplug error a component raises passes unchanged
    refused = label(tiny, tmp_path / "other", "--teacher", "refusing:x")
    assert refused.exit_code == 2
    assert errors(refused) == ["Error: refusing:x cannot read rows of 4 values"]


def test_nan_or_negative_probabilities_from_a_plugin_are_refused_naming_it(faulty, tiny, tmp_path):
    out, teacher = tmp_path / "labels", ["--teacher", tiny["teacher"]]
    for how, kind in (("nan", "NaN"), ("negative", "negative")):
        result = label(tiny, out, *teacher, "--combiner", f"broken,how={how}")
        assert result.exit_code == 1 and errors(result) == [
            f"Error: plugin 'faulty': combiner 'broken,how={how}' returned NaN, Inf or negative "
            "probabilities for 5 rows, e.g. rows [1, 8, 15, 22, 29]"
        ], kind
        assert not out.exists()
    result = label(tiny, out, *teacher, "--generator", "wrong,how=nan")
    assert result.exit_code == 1 and errors(result) == [
        "Error: plugin 'faulty': label generator 'wrong,how=nan' returned NaN, Inf or "
        "negative probabilities for 1 row, e.g. rows [4]"
    ]
    assert not (out / "report.json").exists()


def test_distill_names_a_plugin_combiner_that_fails_or_returns_nan(faulty, digits_splits, tmp_path):
    teacher = tmp_path / "teacher.npy"
    np.save(teacher, np.random.default_rng(0).normal(size=(150, 10)).astype(np.float32))
    out = tmp_path / "run"
    args = ["distill", "--student", "timm:test_resnet", "--train", digits_splits["labeled"]]
    args += ["--teacher", f"logits:{teacher}", "--epochs", "1", "--batch-size", "50"]
    args += ["--device", "cpu", "--workers", "0", "--out", out]
    result = invoke(*args, "--combiner", "broken")
    assert result.exit_code == 1 and errors(result) == [
        "Error: plugin 'faulty' failed in combiner 'broken': ZeroDivisionError: division by zero"
    ]
    result = invoke(*args, "--combiner", "broken,how=nan")
    assert result.exit_code == 1 and errors(result) == [
        "Error: plugin 'faulty': combiner 'broken,how=nan' returned NaN, Inf or negative "
        "probabilities for 21 rows in epoch 1; nothing of that epoch is kept"
    ]
    assert not out.exists()


def test_a_corrupt_store_is_refused_naming_the_file_and_the_rows(tiny, tmp_path):
    from kdplug.data import load_data
    from kdplug.engines.cache import CacheConfig, run_cache
    from kdplug.store.producer import store_producer
    from kdplug.store.reader import open_store

    store = tmp_path / "store"
    config = CacheConfig([tiny["teacher"]], [tiny["data"]], str(store), topk=2, device="cpu")
    config.progress = False
    run_cache(config)
    source = load_data(tiny["data"])
    out = tmp_path / "labels"
    damage = {
        "values": (np.nan, "NaN, Inf or positive log-probabilities"),
        "indices": (9, "class indices outside the store's classes"),
    }
    for name, (value, what) in damage.items():
        array = np.load(store / "split-0" / f"{name}.npy", mmap_mode="r+")
        kept = array[[7, 12]].copy()
        array[[7, 12], 0, 0, 0] = value
        array.flush()
        message = (
            f"store {store} is corrupt: split-0/{name}.npy holds {what} for rows [7, 12] of "
            f"{tiny['data']}; re-run kdplug cache with --overwrite"
        )
        producer = store_producer(str(store), source, None, source.classes)  # distill's
        with pytest.raises(kdplug.UsageError) as refused:
            producer(torch.zeros(15, 4), torch.arange(15))
        assert str(refused.value) == message
        result = label(tiny, out, "--teacher", f"store:{store}")  # the store as a teacher
        assert result.exit_code == 2 and errors(result) == [f"Error: {message}"]
        assert not out.exists()
        array[[7, 12]] = kept
        array.flush()
        del array
    boxes = np.load(store / "split-0" / "boxes.npy", mmap_mode="r+")
    boxes[3, 0, 2] = np.nan
    boxes.flush()
    opened = open_store(store)
    with pytest.raises(kdplug.UsageError, match=r"split-0/boxes.npy holds crop boxes outside"):
        opened.view_inputs(opened.splits[0], torch.zeros(2, 4), np.array([2, 3]), np.zeros(2, int))
    info = json.loads((store / "store.json").read_text())
    info["teachers"][0]["unknown_classes"] = [5]
    (store / "store.json").write_text(json.dumps(info))
    result = label(tiny, out, "--teacher", f"store:{store}")
    assert result.exit_code == 2 and errors(result) == [
        f"Error: store {store} is corrupt or truncated (ValueError: store.json: "
        f"unknown_classes [5] of teacher {tiny['teacher']} are not all class indices in 0..2); "
        "re-run kdplug cache with --overwrite"
    ]


def test_missing_feature_values_for_a_scikit_learn_teacher_name_the_rows(tiny, tmp_path):
    import skops.io
    from sklearn.linear_model import LogisticRegression

    from kdplug.data import load_data

    source = load_data(tiny["data"])
    x, y, _ = source.batch(list(range(30)))
    model = tmp_path / "logreg.skops"
    names = np.array(source.classes)[y.numpy()]
    skops.io.dump(LogisticRegression().fit(x.numpy(), names), model)
    lines = Path(tiny["data"].removeprefix("csv:")).read_text().splitlines()
    for row in (17, 18):  # in the second batch of 10; line 0 is the header
        cells = lines[row + 1].split(",")
        lines[row + 1] = ",".join([cells[0], "", *cells[2:]])
    data = tmp_path / "missing.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "labels"
    args = ["label", "--teacher", f"sklearn:{model}", "--out", out, "--batch-size", "10"]
    result = invoke(*args, "--data", f"csv:{data}")
    assert result.exit_code == 2 and errors(result) == [
        f"Error: sklearn:{model}: LogisticRegression does not accept missing (NaN) or infinite "
        "feature values, which rows [17, 18] hold; fill or drop them in the data"
    ]
    assert not out.exists()


def test_a_calibration_file_with_a_temperature_that_is_not_finite_and_positive_is_refused(
    tiny, tmp_path
):
    from kdplug.calibration import load_temperatures
    from kdplug.file_hashes import file_hash

    teacher = tiny["teacher"]
    fingerprint = file_hash(teacher.removeprefix("logits:"))
    calibration = tmp_path / "calibration.json"
    for temperature in ("Infinity", "NaN", "0", "-1.5", "true", '"2"'):
        calibration.write_text(
            f'{{"teachers": [{{"spec": "{teacher}", "fingerprint": "{fingerprint}", '
            f'"temperature": {temperature}}}]}}'
        )
        shown = {"Infinity": "inf", "NaN": "nan", "true": "True", '"2"': "'2'"}
        message = (
            f"{calibration}: teacher {teacher} has temperature "
            f"{shown.get(temperature, temperature)}; a temperature must be a finite number > 0 "
            "(calibrate it again)"
        )
        with pytest.raises(kdplug.UsageError) as refused:
            load_temperatures(str(calibration), [teacher], [fingerprint])
        assert str(refused.value) == message
    calibration.write_text(calibration.read_text().replace('"2"', "Infinity"))
    result = label(tiny, tmp_path / "labels", "--teacher", teacher, "--calibration", calibration)
    assert result.exit_code == 2 and errors(result) == [
        f"Error: {calibration}: teacher {teacher} has temperature inf; a temperature must be a "
        "finite number > 0 (calibrate it again)"
    ]


def test_a_student_config_with_a_bad_mean_or_std_is_refused_naming_the_file(tmp_path):
    import timm

    from kdplug.model_dir import load_classifier, save_student

    student = tmp_path / "student"
    model = timm.create_model("test_resnet", num_classes=2, in_chans=1)
    options = dict(architecture="test_resnet", classes=["a", "b"], input_size=[1, 8, 8])
    save_student(student, model, **options, mean=[0.5], std=[0.25])
    config_file = student / "config.json"
    config = json.loads(config_file.read_text())
    must = "must be a finite number{} per channel (in_chans is 1) or one for all, got {}"
    cases = [
        ("mean", "x", must.format("", '["x"]')),
        ("mean", float("nan"), must.format("", "[NaN]")),
        ("std", 0.0, must.format(" > 0", "[0.0]")),
        ("std", [1.0, 2.0], must.format(" > 0", "[1.0, 2.0]")),
    ]
    for key, value, message in cases:
        bad = {**config, "pretrained_cfg": {**config["pretrained_cfg"], key: value}}
        config_file.write_text(json.dumps(bad))
        with pytest.raises(kdplug.UsageError) as refused:
            load_classifier(student)
        assert str(refused.value) == f"{config_file}: {key} {message}"
    config_file.write_text(json.dumps(config))
    assert load_classifier(student).classes == ["a", "b"]


def test_a_teacher_naming_a_class_twice_is_refused(faulty, tiny, tmp_path):
    result = label(tiny, tmp_path / "labels", "--teacher", "twins:x")
    assert result.exit_code == 2 and errors(result) == [
        "Error: class 'a' appears more than once in the classes of teacher twins:x: "
        "['a', 'b', 'a']; class names must be distinct"
    ]
    from kdplug.teachers import TeacherSet

    with pytest.raises(kdplug.UsageError, match=r"^class 'a' appears more than once in the run"):
        TeacherSet([lambda x: x], ["t"], ["a", "b", "a"])  # the CLI's --classes refuses it too


SLEEPY_PLUGIN = """
    import time
    from pathlib import Path

    import kdplug

    def sleepy(ref: str):
        '''A teacher that, the first time it meets its second batch, writes REF and waits.'''
        calls = []

        def teacher(x):
            calls.append(len(x))
            if len(calls) == 2 and not Path(ref).exists():
                Path(ref).write_text("waiting")
                time.sleep(120)
            return x[:, :3]

        return teacher

    @kdplug.hookimpl
    def register_teachers(register):
        register("sleepy", sleepy)
"""


def default_ctrl_c() -> None:
    """In the child before exec: Ctrl-C at its default and unblocked. A process inherits an
    ignored or blocked SIGINT across exec (Python then leaves it so), and code run earlier in
    the same pytest worker can leave it either way: the child then never saw the Ctrl-C (2
    of 3 full runs of the suite once, never this test alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_is_one_line_saying_how_to_resume_and_exit_code_130(tiny, tmp_path):
    from tests.conftest import run_cli
    from tests.test_core_plugins import fake_distribution

    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "kdplug-sleepy", "kdplug_sleepy", SLEEPY_PLUGIN, "sleepy")
    waiting, out = tmp_path / "waiting", tmp_path / "labels"
    args = ["label", "--teacher", f"sleepy:{waiting}", "--data", tiny["data"], "--out", str(out)]
    args += ["--batch-size", "10", "--shard-size", "10"]
    env = {**os.environ, "PYTHONPATH": str(site)}
    process = subprocess.Popen(
        [sys.executable, "-m", "kdplug", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_ctrl_c,
    )
    deadline = time.monotonic() + 120
    while not waiting.exists():  # the first shard is written, the second is running
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("Error")] == [
        "Error: interrupted; run the same command with --resume to continue"
    ]
    resumed = run_cli(*args, "--resume", env={"PYTHONPATH": str(site)})
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 30 and report["rows_labeled_this_run"] == 20


HOOK_PLUGIN = """
    import kdplug

    @kdplug.hookimpl
    def on_labels_written(run, path, report):
        raise kdplug.UsageError("the listener wanted another --out")
"""


def test_a_hook_refusing_after_a_finished_run_is_a_warning_and_exit_0(tiny, tmp_path):
    from tests.conftest import run_cli
    from tests.test_core_plugins import fake_distribution

    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "kdplug-picky", "kdplug_picky", HOOK_PLUGIN, "picky")
    out = tmp_path / "labels"
    args = ["label", "--teacher", tiny["teacher"], "--data", tiny["data"], "--out", str(out)]
    result = run_cli(*args, env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("Error")]
    # (the random logits teacher is also flagged near chance: kdplug.teacher_checks)
    warnings = [line for line in result.stderr.splitlines() if "WARNING: plugin" in line]
    assert len(warnings) == 1 and "'picky'" in warnings[0] and "on_labels_written" in warnings[0]
    assert "the listener wanted another --out" in warnings[0]
    assert json.loads((out / "report.json").read_text())["rows"] == 30
