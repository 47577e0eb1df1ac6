"""Run directories (--out) keep the user's data safe: --overwrite never removes an input,
one run at a time holds an --out (a lock naming its holder), names too long for the
temporary siblings and files where a folder goes are refused before any work, and a run
that fails to start, however it fails, leaves --out as it found it."""

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kdplug import UsageError
from kdplug.cli import build_cli
from kdplug.outputs import input_paths, prepare_out_dir
from tests.conftest import run_cli


def invoke(*args, **kwargs):
    """Run the kdplug CLI in this process; returns click's result (stdout and stderr)."""
    return CliRunner().invoke(build_cli(), [str(a) for a in args], **kwargs)


def error_line(result) -> str:
    """The one error line a refused command printed (and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def tiny_run_inputs(root: Path) -> dict[str, str]:
    """A labeled CSV (30 rows, classes a/b/c) and a matching logits teacher, in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = [",".join([*map(str, rng.normal(size=4).round(3)), "abc"[i % 3]]) for i in range(30)]
    (root / "data.csv").write_text("\n".join(["f0,f1,f2,f3,label", *rows]) + "\n")
    np.save(root / "teacher.npy", rng.normal(size=(30, 3)).astype(np.float32))
    return {"data": f"csv:{root / 'data.csv'}", "teacher": f"logits:{root / 'teacher.npy'}"}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def overwrite_label(out, inside, elsewhere, digits):
    return ["label", "--teacher", inside["teacher"], "--data", inside["data"]], "teacher.npy"


def overwrite_cache(out, inside, elsewhere, digits):
    return ["cache", "--teacher", elsewhere["teacher"], "--data", inside["data"]], "data.csv"


def overwrite_self_train(out, inside, elsewhere, digits):
    data = elsewhere["data"]
    args = ["self-train", "--teacher", elsewhere["teacher"], "--student", "timm:test_resnet"]
    return [*args, "--train", data, "--unlabeled", inside["data"], "--val", data], "data.csv"


def overwrite_report_via_symlink(out, inside, elsewhere, digits):
    link = out.parent / "link"
    link.symlink_to(out)  # the data named through a link: found where it really lies
    data = f"csv:{link / 'data.csv'}"
    return ["teachers", "report", "--teacher", elsewhere["teacher"], "--data", data], "data.csv"


def overwrite_distill_config(out, inside, elsewhere, digits):
    config = {"student": "timm:test_resnet", "train": digits["labeled"], "loss": "ce"}
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    return ["distill", "--config", out / "run.yaml"], "run.yaml"


def overwrite_label_config(out, inside, elsewhere, digits):
    config = {"teacher": [elsewhere["teacher"]], "data": elsewhere["data"]}
    (out / "label.yaml").write_text(yaml.safe_dump(config))
    return ["label", "--config", out / "label.yaml"], "label.yaml"


def overwrite_report_config(out, inside, elsewhere, digits):
    config = {"teacher": elsewhere["teacher"], "data": elsewhere["data"]}
    (out / "report.json").write_text(json.dumps(config))
    return ["teachers", "report", "--config", out / "report.json"], "report.json"


@pytest.mark.parametrize(
    "command",
    [
        overwrite_label,
        overwrite_cache,
        overwrite_self_train,
        overwrite_report_via_symlink,
        overwrite_distill_config,
        overwrite_label_config,
        overwrite_report_config,
    ],
)
def test_overwrite_never_deletes_an_input_inside_out(command, tmp_path, digits_splits):
    out = tmp_path / "out"
    inside = tiny_run_inputs(out)
    elsewhere = tiny_run_inputs(tmp_path / "elsewhere")
    args, held = command(out, inside, elsewhere, digits_splits)
    before = snapshot(out)
    result = invoke(*args, "--out", out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert error_line(result) == (
        f"Error: --overwrite would delete {out}, which holds an input of this run "
        f"({out / held}); choose another --out"
    )
    assert snapshot(out) == before


def test_overwrite_never_deletes_the_data_directory_given_as_out(tmp_path, digits_splits):
    data = tmp_path / "train"
    shutil.copytree(digits_splits["labeled"].removeprefix("disk:"), data)
    before = snapshot(data)
    args = ["distill", "--student", "timm:test_resnet", "--train", f"disk:{data}", "--loss", "ce"]
    result = invoke(*args, "--out", data, "--overwrite")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: --overwrite would delete {data}, which holds an input of this run ({data}); "
        "choose another --out"
    )
    assert snapshot(data) == before


def test_an_out_that_is_an_input_file_is_never_written(tmp_path):
    inputs = tiny_run_inputs(tmp_path)
    teacher = tmp_path / "teacher.npy"
    before = teacher.read_bytes()
    args = ["teachers", "calibrate", "--teacher", inputs["teacher"], "--data", inputs["data"]]
    result = invoke(*args, "--out", teacher)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: --out {teacher} is an input of this run ({teacher}); writing the run there "
        "could destroy it; choose another --out"
    )
    assert teacher.read_bytes() == before


def test_input_paths_are_the_local_files_a_spec_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("w.safetensors", "m.skops", "cfg.yaml"):
        (tmp_path / name).touch()
    (tmp_path / "data").mkdir()
    specs = [
        "disk:data",
        "timm:resnet18,checkpoint=w.safetensors,pretrained=false",
        f"sklearn:{tmp_path / 'm.skops'},trusted=a.B;c.D",
        "cfg.yaml",
        "sklearn:digits",  # a built-in dataset, no file
        "logits:absent.npy",
        None,
    ]
    assert input_paths(specs) == [
        Path("data"),
        Path("w.safetensors"),
        tmp_path / "m.skops",
        Path("cfg.yaml"),
    ]


HOLD_LOCK = """
import os, sys, time
from kdplug.outputs import prepare_out_dir
prepare_out_dir(sys.argv[1], resume=True, overwrite=False, marker="run.json", config={"a": 1})
worker = os.fork()  # like a data-loader worker: it outlives a killed run for a while
if worker == 0:
    time.sleep(120)
    os._exit(0)
print(worker, flush=True)
sys.stdin.read()
"""


def test_a_second_run_on_a_locked_out_fails_at_once_naming_the_holder(tmp_path):
    inputs = tiny_run_inputs(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(holder.stdout.readline())
    try:
        args = ["label", "--teacher", inputs["teacher"], "--data", inputs["data"]]
        second = run_cli(*args, "--out", str(out), "--resume", timeout=120)
        assert second.returncode == 2, second.stderr
        line = error_line(second)
        assert line.startswith(
            f"Error: {out} is in use by another run (pid {holder.pid} on {socket.gethostname()} "
            "since "
        )
        assert line.endswith(f"-c {out}); wait for it to end or choose another --out")
        assert not (out / "report.json").exists()
        holder.send_signal(signal.SIGKILL)  # killed, its lock goes with it ...
        holder.wait()
        options = dict(resume=True, overwrite=False, marker="run.json", config={"a": 1})
        assert prepare_out_dir(out, **options) == out
        os.kill(worker, 0)  # ... though its worker, which shares its file, still runs
    finally:
        holder.kill()
        holder.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_an_out_name_whose_temporary_sibling_is_too_long_is_refused_before_work(tmp_path):
    inputs = tiny_run_inputs(tmp_path)
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = tmp_path / ("n" * (limit - 5))  # fits, but .NAME.XXXXXXXX.tmp is 9 bytes over
    result = invoke("label", "--teacher", inputs["teacher"], "--data", inputs["data"], "--out", out)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: the name of --out {out} is 9 bytes too long: kdplug writes beside it a "
        f"temporary .NAME.XXXXXXXX.tmp ({limit + 9} bytes) and {tmp_path} allows {limit}; "
        f"choose a name of at most {limit - 14} bytes"
    )
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["data.csv", "teacher.npy"]


@pytest.mark.parametrize("failure", [RuntimeError("an internal bug"), KeyboardInterrupt()])
def test_a_start_failing_in_any_way_leaves_out_as_it_found_it(failure, tmp_path, monkeypatch):
    import kdplug.engines.label
    from kdplug.engines.label import LabelConfig, run_label

    inputs = tiny_run_inputs(tmp_path / "in")
    out = tmp_path / "out"

    def fail(device):
        raise failure

    monkeypatch.setattr(kdplug.engines.label, "pick_device", fail)  # just after --out is prepared
    config = LabelConfig([inputs["teacher"]], inputs["data"], str(out), progress=False)
    with pytest.raises(type(failure)):
        run_label(config)
    assert sorted(os.listdir(tmp_path)) == ["in"]  # neither out nor its lock file
    monkeypatch.undo()
    assert run_label(config)["rows"] == 30  # the corrected command, without --overwrite
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_an_out_naming_a_file_is_one_line(tmp_path, digits_splits):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    args = ["distill", "--student", "timm:test_resnet", "--train", digits_splits["labeled"]]
    result = invoke(*args, "--loss", "ce", "--out", afile)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: --out {afile} is a file; give a directory (a new or a run's one)"
    )
    assert afile.read_text() == "mine"


def test_demo_in_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: the kernel's answer for a read-only mount
        real = Path.mkdir

        def read_only(self, *args, **kwargs):
            if self.absolute().parent == folder:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.chdir(folder)
    try:
        result = invoke("demo", "--epochs", "1")
    finally:
        folder.chmod(0o755)
    assert result.exit_code == 2
    why = "the file system is read-only" if os.geteuid() == 0 else "permission denied"
    assert error_line(result) == (
        f"Error: cannot write {folder / 'demo-out'}: {why}; give --out a writable folder"
    )
    assert os.listdir(folder) == []


def test_prepare_out_dir_refuses_inputs_from_python_too(tmp_path):
    inputs = tiny_run_inputs(tmp_path)
    options = dict(resume=False, overwrite=True, marker="run.json", config={})
    with pytest.raises(UsageError, match="--overwrite would delete"):
        prepare_out_dir(tmp_path, inputs=[inputs["data"]], **options)
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "teacher.npy"]


def test_a_run_inputs_block_closed_late_removes_only_its_own_paths():
    """A block a caller left open closes whenever its generator is collected, maybe inside
    another run's block: it must not take that run's --config file off the inputs
    --overwrite protects."""
    from kdplug import outputs

    leaked = outputs.run_inputs("first.yaml")
    leaked.__enter__()
    with outputs.run_inputs("second.yaml"):
        leaked.__exit__(None, None, None)
        assert "second.yaml" in outputs._extra_inputs
        assert "first.yaml" not in outputs._extra_inputs
    assert "second.yaml" not in outputs._extra_inputs


def test_a_config_file_stops_counting_as_an_input_when_its_command_fails_to_parse(tmp_path):
    from click.testing import CliRunner

    from kdplug import outputs
    from kdplug.cli import build_cli

    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\n")
    result = CliRunner().invoke(
        build_cli(), ["distill", "--config", str(config), "--batch-size", "abc"]
    )
    assert result.exit_code == 2 and "abc" in result.output
    assert str(config) not in outputs._extra_inputs
