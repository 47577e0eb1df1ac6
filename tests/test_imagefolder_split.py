"""imagefolder:ROOT of split folders: which split is read is said, recorded, and chosen."""

import logging

import numpy as np
import pytest
import skops.io
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from kdplug.data import batches, load_data
from kdplug.errors import UsageError

SPLITS = {"train": 24, "test": 12, "validation": 6}


@pytest.fixture
def folder(tmp_path):
    """Digits 0-2 as PNGs in train/, test/ and validation/, one subfolder per class."""
    digits = load_digits(n_class=3)
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    start = 0
    for split, count in SPLITS.items():
        for row in range(start, start + count):
            folder = tmp_path / "digits" / split / str(digits.target[row])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[row]).save(folder / f"{row}.png")
        start += count
    return tmp_path / "digits"


def said(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "kdplug"]


@pytest.fixture
def caplog(caplog, monkeypatch):
    """caplog at INFO for kdplug's logger, which the CLI's setup keeps from propagating."""
    monkeypatch.setattr(logging.getLogger("kdplug"), "propagate", True)
    caplog.set_level(logging.INFO, logger="kdplug")
    return caplog


def test_imagefolder_says_which_split_it_read_and_which_others_exist(folder, caplog):
    source = load_data(f"imagefolder:{folder}")
    again = load_data(f"imagefolder:{folder}")
    chosen = load_data(f"imagefolder:{folder},split=test")
    assert len(source) == len(again) == SPLITS["train"] and len(chosen) == SPLITS["test"]
    assert said(caplog) == [
        (
            "WARNING",
            f"imagefolder:{folder}: read the 'train' split (24 rows); it also holds 'validation', "
            "'test': add split=NAME to the data spec to read another",
        ),
        (
            "INFO",
            f"imagefolder:{folder}: read the 'test' split (12 rows); it also holds 'train', "
            "'validation'",
        ),
    ]
    assert source.split == {"read": "train", "splits": ["train", "validation", "test"]}
    assert chosen.split == {"read": "test", "splits": ["train", "validation", "test"]}


def test_a_split_that_is_not_there_names_the_splits_there_are(folder):
    with pytest.raises(UsageError) as refused:
        load_data(f"imagefolder:{folder},split=val")
    assert str(refused.value) == (
        f"imagefolder:{folder}: no split 'val'; choose a split with split=NAME "
        "(splits: ['train', 'validation', 'test'])"
    )


def test_a_folder_of_class_folders_alone_is_one_split_and_says_nothing(folder, caplog):
    source = load_data(f"imagefolder:{folder / 'test'}")
    assert len(source) == SPLITS["test"] and said(caplog) == []
    assert source.split == {"read": "train", "splits": ["train"]}


def test_the_teachers_and_label_runs_record_the_split_read(folder, tmp_path):
    """The issue's case: teachers judged on imagefolder:ROOT were judged on their training
    rows; the run's JSON now says which split it read."""
    from kdplug.engines.label import LabelConfig, run_label
    from kdplug.engines.teachers import calibrate

    train = load_data(f"imagefolder:{folder},split=train")
    x, y, _ = next(iter(batches(train, len(train))))
    path = tmp_path / "logreg.skops"
    skops.io.dump(LogisticRegression(max_iter=500).fit(x.flatten(1).numpy(), y.numpy()), path)
    teacher = f"sklearn:{path}"
    judged = calibrate([teacher], f"imagefolder:{folder}", str(tmp_path / "t.json"))
    assert judged["data_split"] == {"read": "train", "splits": ["train", "validation", "test"]}
    labels = run_label(
        LabelConfig(
            [teacher],
            f"imagefolder:{folder},split=test",
            str(tmp_path / "labels"),
            progress=False,
        )
    )
    assert labels["data"]["split"] == {"read": "test", "splits": ["train", "validation", "test"]}
    assert labels["data"]["rows"] == SPLITS["test"]
