"""Rows a user can find: the label output names each row's source file (``file``) or id
(``id_column=NAME``), and ``--eval-labels`` takes a labels-only CSV or parquet, row for row
or keyed by file name / id, refusing repeated, unknown or missing keys and unknown classes."""

import json

import datasets
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kdplug import UsageError
from kdplug.cli import build_cli
from kdplug.data import load_data
from kdplug.engines.self_train import check_eval_labels

FILES = ["ants/0.png", "ants/1.png", "bees/0.png", "bees/1.png"]
# the teacher's classes for the four rows: right on three, wrong on ants/1.png
TEACHER = np.eye(2, dtype=np.float32)[[0, 1, 1, 1]] * 5


@pytest.fixture
def pets(tmp_path, monkeypatch):
    """A class-subfolder image folder ``pets`` (4 images) and a logits teacher, in cwd."""
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(FILES):
        (tmp_path / "pets" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), 50 * i).save(tmp_path / "pets" / name)
    np.save(tmp_path / "t.npy", TEACHER)
    return tmp_path


def label(*extra):
    args = ["label", "--teacher", "logits:t.npy", "--out", "o", "--generator", "threshold,tau=0.5"]
    return CliRunner().invoke(build_cli(), [*args, *extra])


def written(path="o"):
    data = datasets.load_from_disk(path)
    report = json.loads(open(f"{path}/report.json").read())
    return data, report


def test_the_label_output_names_each_rows_file_relative_to_the_data_folder(pets):
    result = label("--data", "imagefolder:pets")
    assert result.exit_code == 0, result.output
    data, _ = written()
    assert data.column_names[:2] == ["index", "file"] and data["file"] == FILES


def test_a_saved_dataset_keeps_the_file_names_it_was_saved_with(pets):
    datasets.load_dataset("imagefolder", data_dir="pets", split="train").save_to_disk("saved")
    assert label("--data", "disk:saved").exit_code == 0
    assert written()[0]["file"] == ["0.png", "1.png", "0.png", "1.png"]


def test_images_without_files_and_tables_without_id_column_have_no_key(pets):
    rows = datasets.Dataset.from_dict({"f": [0.1, 0.2, 0.3, 0.4], "label": [0, 0, 1, 1]})
    rows.to_csv("rows.csv", index=False)
    assert label("--data", "csv:rows.csv").exit_code == 0
    assert "file" not in written()[0].column_names and "id" not in written()[0].column_names


def test_id_column_names_each_row_and_is_never_a_feature(pets):
    (pets / "rows.csv").write_text("pid,f,label\n11,0.1,0\n12,0.2,0\n13,0.3,1\n14,0.4,1\n")
    assert load_data("csv:rows.csv,id_column=pid").input_columns == ["f"]
    assert load_data("csv:rows.csv").input_columns == ["pid", "f"]
    (pets / "truth.csv").write_text("pid,label\n14,1\n11,0\n")
    result = label("--data", "csv:rows.csv,id_column=pid", "--eval-labels", "csv:truth.csv")
    assert result.exit_code == 0, result.output
    data, report = written()
    assert data["id"] == ["11", "12", "13", "14"]
    assert report["eval"]["accepted_labeled_rows"] == 2


def test_eval_labels_from_a_labels_only_csv_row_for_row(pets):
    (pets / "truth.csv").write_text("label\nants\nants\nbees\nbees\n")
    assert label("--data", "pets", "--eval-labels", "truth.csv").exit_code == 0
    evaluation = written()[1]["eval"]
    assert evaluation["accepted_labeled_rows"] == 4 and evaluation["accuracy_accepted"] == 0.75


@pytest.mark.parametrize(
    ("text", "labeled", "accuracy"),
    [
        ("file,label\nbees/1.png,bees\nants/1.png,ants\n", 2, 0.5),  # any order, a subset
        ("file,label\n1.png,bees\n", None, None),  # bare names repeat in pets: refused
    ],
)
def test_eval_labels_keyed_by_file_name(pets, text, labeled, accuracy):
    (pets / "truth.csv").write_text(text)
    result = label("--data", "pets", "--eval-labels", "truth.csv")
    if labeled is None:
        assert result.exit_code == 2
        assert "1 'file' value(s) name no row of DATA: '1.png'" in result.output
        return
    assert result.exit_code == 0, result.output
    evaluation = written()[1]["eval"]
    assert evaluation["accepted_labeled_rows"] == labeled
    assert evaluation["accuracy_accepted"] == accuracy


def test_eval_labels_keyed_by_bare_file_names_where_they_are_distinct(pets):
    (pets / "flat").mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png"]):
        Image.new("L", (4, 4), 50 * i).save(pets / "flat" / name)
    datasets.Dataset.from_dict({"file": ["d.png", "a.png"], "label": ["bees", "ants"]}).to_parquet(
        str(pets / "truth.parquet")
    )
    result = label("--data", "flat", "--eval-labels", "truth.parquet", "--classes", "ants,bees")
    assert result.exit_code == 0, result.output
    assert written()[1]["eval"]["accepted_labeled_rows"] == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\nants/0.png,ants\nants/0.png,bees\n", "'file' values repeat: 'ants/0.png'"),
        ("file,label\nants/9.png,ants\n", "1 'file' value(s) name no row of DATA: 'ants/9.png' "
         "(row 0 of DATA is file 'ants/0.png')"),
        ("file,label\nants/0.png,ants\n,bees\n", "row 1 has no 'file'"),
        ("file,label\nants/0.png,wasps\n", "class names not in the run's classes: 'wasps' "
         "(classes: ants, bees)"),
        ("label\nants\nbees\n", "has 2 rows, DATA has 4; they must match row for row (or give "
         "a 'file' column to match rows by it)"),
        ("file,truth\nants/0.png,ants\n", "has no label column (columns: ['file', 'truth'])"),
    ],
)  # fmt: skip
def test_eval_labels_mistakes_are_one_line(pets, text, message):
    (pets / "truth.csv").write_text(text)
    result = label("--data", "pets", "--eval-labels", "truth.csv")
    assert result.exit_code == 2
    assert message in result.output
    assert "Error: --eval-labels truth.csv" in result.output
    assert not (pets / "o").exists()


def test_self_train_checks_keyed_eval_labels_before_any_work(pets):
    unlabeled = load_data("pets")
    (pets / "truth.csv").write_text("file,label\nbees/0.png,bees\nants/0.png,wasps\n")
    with pytest.raises(UsageError, match="class names not in the run's classes: 'wasps'"):
        check_eval_labels("truth.csv", unlabeled, ["ants", "bees"])
    (pets / "truth.csv").write_text("file,label\nbees/0.png,bees\n")
    check_eval_labels("truth.csv", unlabeled, ["ants", "bees"])
