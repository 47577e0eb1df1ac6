"""``--config FILE`` on every command: the file's keys are the command's flags, flags given
on the command line win, every unknown key is named at once (with the nearest known key),
and a wrongly typed value is refused naming the key and the file."""

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kdplug.cli import build_cli
from tests.test_run_dirs import error_line, tiny_run_inputs

COMMANDS = [
    ["label"],
    ["cache"],
    ["self-train"],
    ["teachers", "report"],
    ["teachers", "calibrate"],
    ["eval"],
    ["distill"],
]


def invoke(*args):
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_unknown_key_is_named_at_once_with_the_nearest_flag(command, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"batch_sise": 8, "devise": "cpu", "frobnicate": 1}))
    result = invoke(*command, "--config", config)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert line.startswith(
        f"Error: config file {config}: unknown keys 'batch_sise' (did you mean 'batch-size'?), "
        "'devise' (did you mean 'device'?), 'frobnicate'; known: "
    )
    assert "config" not in line.split("known: ")[1].split(", ")


def test_export_reads_a_config_file_too(tmp_path):
    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump({"rowz": 8, "format": "onnx"}))
    result = invoke("export", "--config", config)
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith(
        f"Error: config file {config}: unknown key 'rowz' (did you mean 'rows'?); known: "
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch-size": "many"}, "batch-size: 'many' is not a valid integer range."),
        ({"batch-size": 0}, "batch-size: 0 is not in the range x>=1."),
        ({"batch-size": True}, "batch-size must be a number (integer range), got True"),
        ({"data": ["a.csv", "b.csv"]}, "data must be a string (text), got ['a.csv', 'b.csv']"),
        ({"overwrite": "yes"}, "overwrite must be true or false, got 'yes'"),
        ({"teacher": [{"a": 1}]}, "teacher must be a string (text), got {'a': 1}"),
        ({"nproc-per-node": 2}, "unknown key 'nproc-per-node' (command line only)"),
    ],
)
def test_a_wrong_value_is_refused_naming_the_key_and_the_file(values, message, tmp_path):
    config = tmp_path / "label.json"
    config.write_text(json.dumps({"teacher": "logits:t.npy", "data": "csv:d.csv", **values}))
    result = invoke("label", "--config", config, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith(f"Error: config file {config}: {message}")
    assert not (tmp_path / "o").exists()


def test_label_reads_its_options_from_the_file_and_flags_win(tmp_path):
    wrong = tiny_run_inputs(tmp_path / "wrong")
    right = tiny_run_inputs(tmp_path / "right")
    (tmp_path / "right" / "data.csv").write_text(
        "\n".join((tmp_path / "right" / "data.csv").read_text().splitlines()[:11]) + "\n"
    )  # 10 rows: the flag's data, not the file's 30
    np.save(tmp_path / "right" / "teacher.npy", np.eye(3, dtype=np.float32)[[0, 1, 2] * 3 + [0]])
    config = tmp_path / "label.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "teacher": [right["teacher"]],
                "data": wrong["data"],
                "out": str(tmp_path / "out"),
                "generator": "threshold,tau=0.5",
                "shard_size": 4,
                "probs": "none",
            }
        )
    )
    result = invoke("label", "--config", config, "--data", right["data"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"] == 10 and report["data"]["spec"] == right["data"]
    assert report["generator"]["spec"] == "threshold,tau=0.5"
    assert report["probs"]["spec"] == "none"
    assert len(list((tmp_path / "out").glob("data-*.arrow"))) == 3  # shard_size 4


def test_a_required_option_may_come_from_the_file_and_missing_ones_are_named(tmp_path):
    inputs = tiny_run_inputs(tmp_path)
    config = tmp_path / "report.yaml"
    config.write_text(yaml.safe_dump({"teacher": inputs["teacher"], "json": True}))
    result = invoke("teachers", "report", "--config", config)
    assert result.exit_code == 2 and "Missing option '--data'" in result.output
    result = invoke("teachers", "report", "--config", config, "--data", inputs["data"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 30


def test_distill_takes_its_optional_value_flag_from_the_file_and_names_the_file(tmp_path):
    """``augment: true`` is ``--augment`` alone; a bad value is refused naming the file."""
    config = tmp_path / "distill.yaml"
    values = {"student": "timm:test_resnet", "train": "sklearn:digits", "augment": True}
    config.write_text(yaml.safe_dump({**values, "out": str(tmp_path / "o"), "epochs": 0}))
    result = invoke("distill", "--config", config)
    assert result.exit_code == 2, result.output
    assert error_line(result) == (
        f"Error: config file {config}: epochs must be an integer >= 1, got 0"
    )
