"""The data path on hostile or careless data: damaged, empty and oversized images, 16-bit
images, integer labels far from 0..C-1, empty saved datasets, unlabeled data with --classes."""

import io
import json
import logging

import datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kdplug import UsageError
from kdplug.cli import build_cli
from kdplug.data import batches, load_data
from tests.conftest import random_cnn_teacher


def invoke(*args):
    """``kdplug ARGS`` through click's CliRunner (``result.stderr`` holds stderr alone)."""
    return CliRunner().invoke(build_cli(), [str(a) for a in args])


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def image_folder(root, bad: bytes | None = None, size: int = 8):
    """``root/cat/{0,1,2}.png`` (gray noise) and ``root/cat/3.png`` holding ``bad``."""
    (root / "cat").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        noise = rng.integers(0, 256, (size, size), dtype=np.uint8)
        (root / "cat" / f"{i}.png").write_bytes(png_bytes(noise))
    if bad is not None:
        (root / "cat" / "3.png").write_bytes(bad)
    return root


def all_batches(spec: str, batch_size: int = 8, **kwargs):
    return [x for x, _, _ in batches(load_data(spec), batch_size, **kwargs)]


def noise_png(size: int) -> bytes:
    return png_bytes(np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8))


@pytest.mark.parametrize(
    "bad, problem",
    [
        (b"", "the image file is empty (0 bytes)"),
        (b"GIF89a but not really", "not an image PIL can read"),
        (noise_png(64)[:600], "a corrupt or truncated image (OSError: "),
    ],
    ids=["empty", "junk", "truncated"],
)
def test_a_damaged_image_names_its_row_and_file(tmp_path, bad, problem):
    root = image_folder(tmp_path / "data", bad)
    with pytest.raises(UsageError) as caught:
        all_batches(f"imagefolder:{root}")
    message = str(caught.value)
    assert message.startswith(f"imagefolder:{root}: row 3 ({root / 'cat' / '3.png'}): {problem}")
    assert "\n" not in message


def test_a_damaged_first_image_or_one_saved_in_a_dataset_names_its_row(tmp_path):
    good = noise_png(8)
    images = [{"bytes": b"", "path": "first.png"}, {"bytes": good, "path": None}]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(
        UsageError, match=r"^disk:\S+: row 0 \(first.png\): the image file is empty"
    ):
        load_data(f"disk:{tmp_path / 'd'}")


def test_a_damaged_image_read_in_a_loader_worker_is_the_same_one_line(tmp_path):
    root = image_folder(tmp_path / "data", b"junk")
    with pytest.raises(UsageError) as caught:
        all_batches(f"imagefolder:{root}", batch_size=2, workers=1)
    assert str(caught.value).startswith(f"imagefolder:{root}: row 3 (")
    assert "\n" not in str(caught.value)


def test_a_bad_image_is_one_line_exit_2_and_leaves_no_run_directory(tmp_path):
    root = image_folder(tmp_path / "data", b"")
    teacher = random_cnn_teacher(tmp_path / "cnn.pt", 2, 8)  # a teacher that reads images
    out = tmp_path / "out"
    result = invoke(
        "label", "--teacher", teacher, "--data", f"imagefolder:{root}",
        "--classes", ",".join(map(str, range(10))), "--out", out,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: imagefolder:{root}: row 3 ({root / 'cat' / '3.png'}): "
        "the image file is empty (0 bytes)"
    )
    assert "Traceback" not in result.stderr and not out.exists()


def test_precomputed_teachers_never_read_the_images(tmp_path):
    """``logits:`` serves its rows by position, so a damaged image nobody reads is no error."""
    root = image_folder(tmp_path / "data", b"")
    np.save(tmp_path / "logits.npy", np.zeros((4, 2), np.float32))
    result = invoke(
        "label", "--teacher", f"logits:{tmp_path / 'logits.npy'}", "--data",
        f"imagefolder:{root}", "--classes", "a,b", "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("limit", [600, 1000], ids=["error-zone", "warning-zone"])
def test_an_image_over_the_decompression_bomb_limit_is_refused_naming_the_limit(
    tmp_path, monkeypatch, limit
):
    # 32x32 = 1024 pixels: over 2 x 600 PIL raises, over 1000 (under 2x) PIL only warns
    root = image_folder(tmp_path / "data", noise_png(32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(UsageError) as caught:
        all_batches(f"imagefolder:{root},image_size=8")
    assert str(caught.value) == (
        f"imagefolder:{root},image_size=8: row 3 ({root / 'cat' / '3.png'}): the image has "
        f"32x32 = 1024 pixels, over PIL's decompression-bomb limit of {limit} "
        "(Image.MAX_IMAGE_PIXELS); if you trust the file, add max_pixels=N to the data spec"
    )
    # the spec may raise the limit for its own images; PIL's global limit is left as it was
    (x,) = all_batches(f"imagefolder:{root},image_size=8,max_pixels=2000")
    assert x.shape == (4, 1, 8, 8) and Image.MAX_IMAGE_PIXELS == limit
    with pytest.raises(UsageError, match="max_pixels must be a positive integer"):
        load_data(f"imagefolder:{root},max_pixels=-5")


def test_16_bit_grayscale_images_are_scaled_by_their_bit_depth(tmp_path):
    (tmp_path / "deep" / "a").mkdir(parents=True)
    for value in (1000, 60000):
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(
            tmp_path / "deep" / "a" / f"{value}.png"
        )
    source = load_data(f"imagefolder:{tmp_path / 'deep'}")
    assert source.input_shape == (1, 4, 4)
    (x,) = all_batches(f"imagefolder:{tmp_path / 'deep'}")
    assert sorted(x[:, 0, 0, 0].tolist()) == [
        np.float32(1000 / 65535),
        np.float32(60000 / 65535),
    ]
    assert (x == x[:, :, :1, :1]).all()  # every pixel, also after a resize
    (resized,) = all_batches(f"imagefolder:{tmp_path / 'deep'},image_size=6")
    assert sorted(resized[:, 0, 3, 3].tolist()) == pytest.approx([1000 / 65535, 60000 / 65535])


def test_float_images_must_hold_intensities_in_0_1(tmp_path):
    (tmp_path / "f" / "a").mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 0.25, np.float32)).save(tmp_path / "f" / "a" / "0.tiff")
    Image.fromarray(np.full((4, 4), 0.75, np.float32)).save(tmp_path / "f" / "a" / "1.tiff")
    (x,) = all_batches(f"imagefolder:{tmp_path / 'f'}")
    assert sorted(x[:, 0, 0, 0].tolist()) == [0.25, 0.75]
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(tmp_path / "f" / "a" / "2.tiff")
    with pytest.raises(UsageError, match=r"row 2 \(.*2.tiff\): a 32-bit float image \(mode F\) "):
        all_batches(f"imagefolder:{tmp_path / 'f'}")


def labeled_table(tmp_path, name: str, labels: list, fmt: str) -> str:
    table = datasets.Dataset.from_dict(
        {"v": [float(i) for i in range(len(labels))], "label": labels}
    )
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    return f"{'disk' if fmt == 'disk' else fmt}:{path}"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "disk"])
def test_integer_labels_are_classes_by_their_distinct_values(tmp_path, caplog, fmt):
    spec = labeled_table(tmp_path, "far", [5000, 90000, 5000], fmt)
    with caplog.at_level(logging.INFO, logger="kdplug"):
        source = load_data(spec)
    assert source.classes == ["5000", "90000"]
    assert source.labels().tolist() == [0, 1, 0]
    assert next(iter(batches(source, 3)))[1].tolist() == [0, 1, 0]
    said = [r.getMessage() for r in caplog.records if "not 0..C-1" in r.getMessage()]
    assert said == [
        f"{spec}: the integer labels are not 0..C-1; the classes are their 2 distinct values "
        "5000, 90000 (a row's class is its label's position in this list)"
    ]
    # mapped onto named run classes (--classes) by name
    assert source.with_classes(["90000", "1", "5000"]).labels().tolist() == [2, 0, 2]


def test_labels_0_to_c_minus_1_and_class_label_names_are_kept(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kdplug"):
        dense = load_data(labeled_table(tmp_path, "dense", [2, 0, 1, -1], "csv"))
        named = load_data("sklearn:iris")
    assert dense.classes == ["0", "1", "2"] and dense.labels().tolist() == [2, 0, 1, -1]
    assert named.classes == ["setosa", "versicolor", "virginica"]
    assert not [r for r in caplog.records if "not 0..C-1" in r.getMessage()]
    # a CSV label column with an empty cell is read as floats: still the integer classes
    (tmp_path / "gap.csv").write_text("v,label\n1,3\n2,\n3,1\n")
    gap = load_data(f"csv:{tmp_path / 'gap.csv'}")
    assert gap.classes == ["1", "3"] and gap.labels().tolist() == [1, -1, 0]


def test_an_empty_saved_dataset_or_split_is_refused(tmp_path):
    features = datasets.Features({"v": datasets.Value("float32"), "label": datasets.Value("int64")})
    empty = datasets.Dataset.from_dict({"v": [], "label": []}, features=features)
    full = datasets.Dataset.from_dict({"v": [1.0, 2.0], "label": [0, 1]}, features=features)
    empty.save_to_disk(str(tmp_path / "empty"))
    datasets.DatasetDict({"train": full, "test": empty}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(UsageError) as caught:
        load_data(f"disk:{tmp_path / 'empty'}")
    assert str(caught.value) == f"disk:{tmp_path / 'empty'}: the dataset is empty"
    with pytest.raises(UsageError) as caught:
        load_data(f"disk:{tmp_path / 'dict'},split=test")
    assert str(caught.value) == f"disk:{tmp_path / 'dict'},split=test: the dataset is empty"
    # the other split of that DatasetDict still loads
    assert len(load_data(f"disk:{tmp_path / 'dict'}")) == 2
    result = invoke(
        "label", "--teacher", f"logits:{tmp_path / 'absent.npy'}", "--data",
        f"disk:{tmp_path / 'empty'}", "--classes", "a,b", "--out", tmp_path / "o",
    )  # fmt: skip
    assert (result.exit_code, result.stderr) == (
        2,
        f"Error: disk:{tmp_path / 'empty'}: the dataset is empty\n",
    )


def test_cache_with_classes_on_unlabeled_data(tmp_path):
    rng = np.random.default_rng(0)
    datasets.Dataset.from_dict(
        {"a": rng.random(6).tolist(), "b": rng.random(6).tolist()}
    ).save_to_disk(str(tmp_path / "unlabeled"))
    np.save(tmp_path / "logits.npy", rng.normal(size=(6, 3)).astype(np.float32))
    out = tmp_path / "store"
    result = invoke(
        "cache", "--teacher", f"logits:{tmp_path / 'logits.npy'}", "--data",
        f"disk:{tmp_path / 'unlabeled'}", "--classes", "x,y,z", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    store = json.loads((out / "store.json").read_text())
    assert store["classes"] == ["x", "y", "z"] and store["splits"][0]["rows"] == 6


def test_a_mean_or_std_that_fits_no_channel_count_is_refused_naming_the_teacher():
    from kdplug.preprocess import Preprocess
    from kdplug.teacher_io import preprocess

    with pytest.raises(UsageError) as caught:
        preprocess("torchscript:t.pt", None, [0.5, 0.5], 1.0, 3)
    assert str(caught.value) == (
        "torchscript:t.pt: mean has 2 values but in_chans is 3; give one per channel or one for all"
    )
    with pytest.raises(UsageError, match="std has 2 values but in_chans is 1"):
        Preprocess(std=[0.5, 0.5], in_chans=1)
    x = Preprocess(mean=[0.5, 0.4, 0.3], std=0.2, in_chans=3)(torch.ones(1, 1, 2, 2))
    assert x.shape == (1, 3, 2, 2)  # gray input repeated to the 3 channels


def test_data_options_and_the_source_s_options_are_taken_as_written(tmp_path):
    (tmp_path / "rows.csv").write_text("x,01\n0.5,a\n1.5,b\n")
    source = load_data(f"csv:{tmp_path / 'rows.csv'},label_column=01")
    assert source.label_column == "01" and source.classes == ["a", "b"]
    features = datasets.Features({"v": datasets.Value("float32")})
    part = datasets.Dataset.from_dict({"v": [1.0]}, features=features)
    datasets.DatasetDict({"2024": part, "2025": part}).save_to_disk(str(tmp_path / "years"))
    assert len(load_data(f"disk:{tmp_path / 'years'},split=2024")) == 1
