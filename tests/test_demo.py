"""kdplug demo: the embedded end-to-end run, exactly as `make demo` runs it."""

import json

from tests.conftest import invoke_cli, run_cli

CHEAPEST = ["--epochs", "1", "--labeled", "20"]  # the lowest values `kdplug demo` takes


def test_demo_distilled_student_beats_labeled_only(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rows = {
        row["model"]: row["test_accuracy"]
        for row in json.loads((out / "demo.json").read_text())["rows"]
    }
    assert rows["student, distilled"] > rows["student, labeled only"] + 0.03
    table = result.stdout.split("model ", 1)[1]
    for name, accuracy in rows.items():
        assert f"{accuracy:.4f}" in table and name in table
    assert "pseudo-labels:" in result.stdout
    # never silent for long, and no carriage-return bars in a log: progress lines per stage
    assert "\r" not in result.stderr
    assert "kdplug: INFO: label: batch " in result.stderr
    assert "kdplug: INFO: epoch 1: loss " in result.stderr
    assert (out / "distilled" / "student" / "model.safetensors").exists()
    assert (out / "labels" / "report.json").exists()
    # a previous demo is replaced: the cheapest demo, in this process (the run above was the
    # real command)
    again = invoke_cli("demo", "--out", out, *CHEAPEST)
    assert again.exit_code == 0, again.output
    config = json.loads((out / "demo.json").read_text())["config"]
    assert (config["epochs"], config["labeled"]) == (1, 20)


def test_demo_refuses_a_directory_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = invoke_cli("demo", "--out", tmp_path)
    assert result.exit_code == 2
    assert "does not hold a kdplug demo" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
