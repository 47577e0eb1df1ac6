"""The data path: every first-party source, column detection, decoding, batching."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from kdplug import UsageError
from kdplug.data import batches, load_data


def image_dataset(sizes, modes=None, labels=None):
    modes = modes or ["L"] * len(sizes)
    images = [
        Image.new(m, s, color=(40 * i) % 256 if m == "L" else (10 * i, 20, 30))
        for i, (s, m) in enumerate(zip(sizes, modes))
    ]
    features = datasets.Features(
        {"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b"])}
    )
    return datasets.Dataset.from_dict(
        {"picture": images, "kind": labels or [i % 2 for i in range(len(images))]},
        features=features,
    )


def test_sklearn_digits_batches():
    source = load_data("sklearn:digits")
    assert (source.kind, source.input_shape, len(source)) == ("image", (1, 8, 8), 1797)
    assert source.classes == [str(i) for i in range(10)]
    x, y, idx = next(iter(batches(source, 32)))
    assert x.dtype == torch.float32 and x.shape == (32, 1, 8, 8)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y.tolist() == source.labels()[:32].tolist() and idx.tolist() == list(range(32))


def test_shuffled_batches_cover_every_row_once_and_depend_on_seed_and_epoch():
    source = load_data("sklearn:iris")
    seen = torch.cat([idx for _, _, idx in batches(source, 16, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == list(range(150)) and seen.tolist() != list(range(150))
    again = torch.cat([i for _, _, i in batches(source, 16, shuffle=True, seed=1)])
    other = torch.cat([i for _, _, i in batches(source, 16, shuffle=True, seed=1, epoch=1)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def test_disk_dataset_and_dataset_dict(tmp_path):
    data = image_dataset([(5, 4)] * 4)
    data.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(
        str(tmp_path / "dict")
    )
    source = load_data(f"disk:{tmp_path / 'one'}")
    assert (source.input_columns, source.label_column, source.classes) == (
        ["picture"],
        "kind",
        ["a", "b"],
    )
    assert source.input_shape == (1, 4, 5)
    assert len(load_data(f"disk:{tmp_path / 'dict'},split=test")) == 1
    assert len(load_data(f"disk:{tmp_path / 'dict'}")) == 4


def test_tabular_csv_with_string_labels(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b,name,label\n1,2,x,cat\n3,4,y,dog\n5,6,z,cat\n")
    source = load_data(f"csv:{path}")
    assert source.kind == "tabular" and source.input_columns == ["a", "b"]
    assert source.classes == ["cat", "dog"]
    x, y, _ = next(iter(batches(source, 8)))
    assert x.tolist() == [[1, 2], [3, 4], [5, 6]] and y.tolist() == [0, 1, 0]
    mapped = source.with_classes(["dog", "bird", "cat"])
    assert mapped.labels().tolist() == [2, 0, 2]


def test_parquet_and_hf_local(tmp_path):
    table = datasets.Dataset.from_dict({"f1": [0.5, 1.5], "f2": [1.0, 2.0], "labels": [1, 0]})
    (tmp_path / "pq").mkdir()
    table.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    source = load_data(f"parquet:{tmp_path / 'pq'}")
    assert source.input_columns == ["f1", "f2"] and source.classes == ["0", "1"]
    hub_like = load_data(f"hf:{tmp_path / 'pq'},split=train")
    assert len(hub_like) == 2 and hub_like.label_column == "labels"


def test_imagefolder(tmp_path):
    for cls in ("ants", "bees"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (6, 6), (i * 50, 0, 0)).save(tmp_path / cls / f"{i}.png")
    source = load_data(f"imagefolder:{tmp_path}")
    assert source.classes == ["ants", "bees"] and source.input_shape == (3, 6, 6)
    x, y, _ = next(iter(batches(source, 4)))
    assert x.shape == (4, 3, 6, 6) and sorted(y.tolist()) == [0, 0, 1, 1]


def test_column_overrides_and_missing_columns(tmp_path):
    data = datasets.Dataset.from_dict({"text": ["a", "b"], "target": ["p", "q"]})
    data.save_to_disk(str(tmp_path / "t"))
    with pytest.raises(UsageError, match=r"no image column .* columns are \['text', 'target'\]"):
        load_data(f"disk:{tmp_path / 't'}")
    with pytest.raises(UsageError, match="no label column 'nope'"):
        load_data(f"disk:{tmp_path / 't'},label_column=nope")
    numbers = datasets.Dataset.from_dict({"v": [1.0, 2.0], "target": [0, 1]})
    numbers.save_to_disk(str(tmp_path / "n"))
    source = load_data(f"disk:{tmp_path / 'n'},label_column=target")
    assert source.label_column == "target" and source.input_columns == ["v"]


def test_mixed_sizes_need_image_size_and_modes_are_converted(tmp_path):
    image_dataset([(4, 4), (4, 4), (6, 6)]).save_to_disk(str(tmp_path / "mixed"))
    source = load_data(f"disk:{tmp_path / 'mixed'}")
    with pytest.raises(UsageError, match=r"row 2: image is 6x6.*image_size=4"):
        next(iter(batches(source, 3)))
    resized = load_data(f"disk:{tmp_path / 'mixed'},image_size=8")
    assert next(iter(batches(resized, 3)))[0].shape == (3, 1, 8, 8)
    image_dataset([(4, 4)] * 2, modes=["RGB", "L"]).save_to_disk(str(tmp_path / "modes"))
    x = next(iter(batches(load_data(f"disk:{tmp_path / 'modes'}"), 2)))[0]
    assert x.shape == (2, 3, 4, 4)
    assert torch.equal(x[1, 0], x[1, 1]) and torch.equal(x[1, 1], x[1, 2])


def test_a_color_image_in_grayscale_data_needs_image_mode(tmp_path):
    image_dataset([(4, 4)] * 3, modes=["L", "L", "RGB"]).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UsageError, match=r"row 2: a RGB image in data whose first image is gray"):
        next(iter(batches(load_data(f"disk:{tmp_path / 'd'}"), 3)))
    color = load_data(f"disk:{tmp_path / 'd'},image_mode=RGB")
    x = next(iter(batches(color, 3)))[0]
    assert color.input_shape == (3, 4, 4) and x.shape == (3, 3, 4, 4)
    assert x[2, 0, 0, 0] == pytest.approx(20 / 255) and x[2, 1, 0, 0] == pytest.approx(20 / 255)
    gray = next(iter(batches(load_data(f"disk:{tmp_path / 'd'},image_mode=L"), 3)))[0]
    assert gray.shape == (3, 1, 4, 4)
    with pytest.raises(UsageError, match="image_mode must be L or RGB"):
        load_data(f"disk:{tmp_path / 'd'},image_mode=CMYK")


def test_array_images_and_missing_labels(tmp_path):
    arrays = np.random.default_rng(0).integers(0, 255, size=(3, 5, 5, 3)).astype(np.uint8)
    datasets.Dataset.from_dict({"pixel_values": arrays.tolist()}).save_to_disk(str(tmp_path / "a"))
    source = load_data(f"disk:{tmp_path / 'a'}")
    x, y, _ = next(iter(batches(source, 3)))
    assert x.shape == (3, 3, 5, 5) and y.tolist() == [-1, -1, -1]
    assert torch.allclose(
        x[0], torch.tensor(arrays[0] / 255.0, dtype=torch.float32).permute(2, 0, 1)
    )


def test_empty_or_unreadable_dataset_is_refused(tmp_path):
    features = datasets.Features({"v": datasets.Value("float32"), "label": datasets.Value("int64")})
    empty = datasets.Dataset.from_dict({"v": [], "label": []}, features=features)
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(UsageError, match="the dataset is empty"):
        load_data(f"parquet:{tmp_path / 'empty.parquet'}")
    (tmp_path / "empty.csv").write_text("a,b,label\n")
    with pytest.raises(UsageError, match="the dataset is empty"):
        load_data(f"csv:{tmp_path / 'empty.csv'}")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "state.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not a readable saved dataset"):
        load_data(f"disk:{tmp_path / 'junk'}")


def test_unknown_bundled_set_and_bad_batch_size():
    with pytest.raises(UsageError, match="choose one of digits"):
        load_data("sklearn:mnist")
    with pytest.raises(UsageError, match="batch size must be at least 1"):
        batches(load_data("sklearn:iris"), 0)


@pytest.mark.parametrize(
    "values",
    [
        ["b", "a", None, "c", "a", "b", "c"],  # names, one missing
        [7, 3, 3, None, 12, 7, 12],  # integers that are not 0..C-1
        [0.5, 1.5, 0.5, 1.5, None, 0.5, 1.5],
    ],
)
def test_labels_map_raw_values_as_one_arrow_lookup(tmp_path, values):
    """``DataSource.labels()`` of a column of raw values (not a ClassLabel), also after
    ``with_classes`` took one class away and added one: as the row-by-row lookup maps them."""
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"x": list(range(len(values))), "label": values}).to_parquet(
        str(path)
    )
    source = load_data(f"parquet:{path}")
    assert source.label_values is not None
    by_row = source._labels({"label": values})
    assert source.labels().tolist() == by_row and -1 in by_row
    remapped = source.with_classes([source.classes[1], "new", source.classes[0]])
    expected = remapped._labels({"label": values})
    assert remapped.labels().tolist() == expected and sorted(set(expected)) == [-1, 0, 2]


def test_a_label_column_of_lists_is_refused_in_one_line(tmp_path):
    datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [[1, 2], [3]]}).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(UsageError, match=r"label column 'label' holds values that are not class"):
        load_data(f"disk:{tmp_path / 'd'}")


def test_value_positions_match_as_the_row_by_row_lookup_or_say_they_cannot():
    import pyarrow as pa

    from kdplug.data import value_positions

    floats = pa.chunked_array([pa.array([1.0, 2.0, float("nan"), None, -1.0, 2.0])])
    assert value_positions(floats, {1: 0, 2: 1}).tolist() == [0, 1, -1, -1, -1, 1]  # CSV ints
    ints = pa.chunked_array([pa.array([1, 2, None, 7], type=pa.int32())])
    assert value_positions(ints, {1: 0, 2: 1, 7: 2}).tolist() == [0, 1, -1, 2]
    names = pa.chunked_array([pa.array(["b", "x", "a"])])
    assert value_positions(names, {"a": 0, "b": 1, object(): 2}).tolist() == [1, -1, 0]
    assert value_positions(names, {1: 0}) is None  # names against numbers: not matched
