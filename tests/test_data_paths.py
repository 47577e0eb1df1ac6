"""DATA as users type it: a bare path is read by the source that fits what it holds (and the
log says which), a registered source's name wins over a path, and ``disk:`` on a folder it
cannot read names the source that can."""

import logging

import datasets
import pytest
from click.testing import CliRunner
from PIL import Image

from kdplug import UsageError
from kdplug.cli import build_cli
from kdplug.data import load_data


@pytest.fixture
def said(caplog):
    """kdplug's log lines (its logger may not propagate to the root logger)."""
    logger = logging.getLogger("kdplug")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="kdplug")
    yield caplog
    logger.removeHandler(caplog.handler)


def images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("L", (4, 4), 40 * i).save(folder / name)


def class_tree(root):
    for cls in ("ants", "bees"):
        images(root / cls, ["0.png", "1.png"])


def split_tree(root):
    class_tree(root / "train")
    images(root / "test" / "ants", ["9.png"])


def flat_folder(root):
    images(root, ["a.png", "b.jpg", "c.png"])


def rows():
    return datasets.Dataset.from_dict({"f1": [0.5, 1.5, 2.5], "label": [1, 0, 1]})


def saved_dataset(root):
    rows().save_to_disk(str(root))


def saved_dataset_dict(root):
    datasets.DatasetDict({"train": rows()}).save_to_disk(str(root))


def csv_file(root):
    rows().to_csv(str(root))


def parquet_file(root):
    rows().to_parquet(str(root))


def parquet_folder(root):
    root.mkdir()
    rows().to_parquet(str(root / "part-0.parquet"))


def csv_folder(root):
    root.mkdir()
    rows().to_csv(str(root / "part-0.csv"))


@pytest.mark.parametrize(
    ("name", "make", "source", "holds", "count"),
    [
        ("mnist/test", class_tree, "imagefolder", "a folder of class subfolders", 4),
        ("mnist", split_tree, "imagefolder", "a folder of split folders of class subfolders", 4),
        ("raw", flat_folder, "imagefolder", "a flat folder of images", 3),
        ("saved", saved_dataset, "disk", "a saved Dataset (save_to_disk)", 3),
        ("dict", saved_dataset_dict, "disk", "a saved DatasetDict (save_to_disk)", 3),
        ("rows.csv", csv_file, "csv", "a CSV file", 3),
        ("rows.parquet", parquet_file, "parquet", "a Parquet file", 3),
        ("shards", parquet_folder, "parquet", "a folder of .parquet files", 3),
        ("tables", csv_folder, "csv", "a folder of .csv files", 3),
    ],
)
def test_a_bare_path_is_read_by_the_source_that_fits(
    name, make, source, holds, count, tmp_path, monkeypatch, said
):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / name)
    data = load_data(name)
    assert data.spec == f"{source}:{name}" and len(data) == count
    assert f"data {name}: {holds}, read as {source}:{name}" in said.text


def test_options_follow_a_bare_path_after_a_comma(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    class_tree(tmp_path / "mnist" / "test")
    data = load_data("mnist/test,image_size=8,image_mode=RGB")
    assert data.spec == "imagefolder:mnist/test,image_size=8,image_mode=RGB"
    assert data.input_shape == (3, 8, 8) and data.classes == ["ants", "bees"]


def test_a_registered_source_name_wins_over_a_path_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    class_tree(tmp_path / "csv")  # a folder named like the csv source
    with pytest.raises(UsageError, match="csv needs a reference"):
        load_data("csv")
    assert load_data("./csv").spec == "imagefolder:./csv"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mnist/nothere", "data mnist/nothere: no such file or directory (a DATA spec is a path"),
        (r"C:\data\x", r"data C:\data\x: no such file or directory"),
        ("mnsit", "unknown dataset 'mnsit'"),
        ("empty", "data empty: a folder with no images, saved dataset, .csv or .parquet files; "
         "name its source: NAME:PATH with NAME one of csv, disk"),
        ("notes.txt", "data notes.txt: notes.txt is not a .csv or .parquet file"),
    ],
)  # fmt: skip
def test_a_path_kdplug_cannot_read_says_why(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError) as caught:
        load_data(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("make", "holds", "source"),
    [
        (class_tree, "a folder of class subfolders", "imagefolder"),
        (flat_folder, "a flat folder of images", "imagefolder"),
        (parquet_folder, "a folder of .parquet files", "parquet"),
    ],
)
def test_disk_on_a_folder_it_cannot_read_names_the_source_that_can(
    make, holds, source, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / "pics")
    with pytest.raises(UsageError) as caught:
        load_data("disk:pics")
    assert str(caught.value).endswith(f"; it is {holds}: read it with {source}:pics")


def test_every_command_takes_a_bare_path(tmp_path, monkeypatch):
    """Through the CLI (here teachers report: its --data, one line saying the source)."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    csv_file(tmp_path / "rows.csv")
    np.save(tmp_path / "t.npy", np.eye(2, dtype=np.float32)[[1, 0, 1]] * 5)
    args = ["teachers", "report", "--teacher", "logits:t.npy", "--data", "rows.csv", "--json"]
    result = CliRunner().invoke(build_cli(), args)
    assert result.exit_code == 0, result.output
    assert '"accuracy": 1.0' in result.stdout
