"""bench/store_speed.py runs on tiny data and produces every figure (no speed asserted)."""

import json
import math
import runpy
import sys

from tests.conftest import ROOT


def test_store_benchmark_produces_its_figures(tmp_path, monkeypatch, capsys):
    out = tmp_path / "figures.json"
    script = ROOT / "bench" / "store_speed.py"  # run as a script, in this process
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny", "--json", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    figures = json.loads(out.read_text())
    runs = figures["runs"]
    assert sorted(runs) == [
        "a_labels_only",
        "b_live_1_teacher",
        "c_live_3_teachers",
        "d_store_3_teachers",
    ]
    for entry in runs.values():
        assert entry["epoch_time_s"] > 0 and math.isfinite(entry["epoch_time_ratio_to_a"])
        assert 0 <= entry["test_accuracy"] <= 1
    assert runs["a_labels_only"]["epoch_time_ratio_to_a"] == 1
    assert math.isfinite(figures["d_minus_c_accuracy_points"])
    size = figures["store_bytes_per_row_per_teacher_per_view"]
    assert 0 < size["teacher_outputs"] <= size["all_arrays"]
    assert figures["command"]["topk"] == 5 and figures["machine"]["cpus"] >= 1
