"""Hypothesis properties of the data path on hostile input: random spec strings, CSV and
parquet cells, and image files (random bytes, empty, truncated, valid of any mode and depth).

Each either loads (images as finite float32 in [0, 1]) or fails with a kdplug UsageError of
one line that names the file or the row; through ``kdplug label`` the input files stay
byte-identical and a failed run leaves no ``--out``.
"""

import csv
import hashlib
import io
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from kdplug import UsageError
from kdplug.cli import build_cli
from kdplug.data import batches, load_data
from kdplug.spec import Spec, parse_spec

PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
CLI_SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def assert_one_line(exc: Exception, *names: str) -> None:
    """A UsageError of one non-empty line naming one of ``names`` or a row."""
    message = str(exc)
    assert isinstance(exc, UsageError), f"{type(exc).__name__}: {message}"
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    assert any(name in message for name in names) or re.search(r"\brow \d+", message), message


def load_everything(spec: str):
    """``load_data(spec)`` and every batch of it, or the UsageError it raised."""
    try:
        source = load_data(spec)
        loaded = list(batches(source, 3))
    except Exception as exc:  # the property: only a UsageError may come out
        event(f"{type(exc).__name__}: {re.sub(r'[/(].*', '', str(exc).split(': ', 1)[-1])}")
        return None, exc
    event(f"loaded {source.kind}")
    return source, loaded


def check_batches(source, loaded) -> None:
    """Batches of the right dtype and shape; image values finite and in [0, 1]; labels in
    -1..C-1."""
    classes = len(source.classes or [])
    for x, y, idx in loaded:
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == tuple(source.input_shape)
        assert y.dtype == torch.int64 and len(y) == len(x) == len(idx)
        assert ((y >= -1) & (y < max(classes, 0))).all() or (y == -1).all()
        if source.kind == "image":
            assert torch.isfinite(x).all() and (x >= 0).all() and (x <= 1).all()


def tree_hash(*paths: Path) -> dict[str, str]:
    """``{file: sha256}`` of every file under ``paths``."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


# spec strings -------------------------------------------------------------------------

SPEC_CHARS = st.sampled_from(list('abcsvdkiq019:,=;"\\ ._-/é\n\t\x00') + ["split", "image"])
SPEC_TEXT = st.lists(SPEC_CHARS, max_size=24).map("".join) | st.text(max_size=16)
DATA_NAMES = st.sampled_from(
    ["sklearn", "sklearn", "sklearn", "disk", "csv", "parquet", "imagefolder", "nope", ""]
)
DATA_OPTION = st.sampled_from(
    ["split", "image_size", "image_mode", "label_column", "image_column", "max_pixels", "x"]
)
OPTION_VALUE = st.sampled_from(["", "0", "-3", "8", "8;8", "1e99", "RGB", "CMYK", "none", '"a,b"'])


@st.composite
def data_specs(draw) -> str:
    """A DATA spec: a known or unknown source, a random reference, random options."""
    ref = draw(st.sampled_from(["digits", "iris", "wine", "", "no/such/dir"]) | SPEC_TEXT)
    options = draw(
        st.lists(st.tuples(DATA_OPTION, OPTION_VALUE), max_size=2, unique_by=lambda o: o[0])
    )
    text = f"{draw(DATA_NAMES)}:{ref}" + "".join(f",{k}={v}" for k, v in options)
    return draw(st.sampled_from([text, text, text, text + draw(SPEC_TEXT)]))


@PROPERTY_SETTINGS
@given(text=SPEC_TEXT | data_specs())
def test_parse_spec_returns_a_spec_or_a_one_line_usage_error(text):
    try:
        assert isinstance(parse_spec(text), Spec)
    except UsageError as exc:
        assert str(exc).strip() and "\n" not in str(exc), repr(str(exc))


@PROPERTY_SETTINGS
@given(spec=data_specs())
@example(spec="disk:no\nsuch")  # a newline in the reference: the message stays one line
@example(spec="sklearn:0\n0,split=")  # and in an option error naming the reference
@example(spec="sklearn:digits,image_size=8;12,image_mode=RGB")
@example(spec="sklearn:iris,label_column=a;b")  # a list where a column name belongs
@example(spec="sklearn:digits,image_mode=L;RGB")
def test_random_data_specs_load_or_fail_in_one_line(spec):
    source, loaded = load_everything(spec)
    if source is None:
        try:  # the message names the data source (or the bad spec itself)
            parsed = parse_spec(spec)
            names = [parsed.name, *([parsed.ref, repr(parsed.ref)] if parsed.ref else [])]
        except UsageError:
            names = ["spec"]
        assert_one_line(loaded, *names)
    else:
        check_batches(source, loaded)


# CSV and parquet cells ---------------------------------------------------------------

CELL = st.one_of(
    st.integers(-3, 3),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "nan", "NaN", "inf", "-inf", "None", "true", "1e999", "0x10"]),
    st.text(max_size=5),
)


@st.composite
def csv_text(draw) -> str:
    """A CSV of 1-4 rows: 1-3 feature columns and maybe a label column, random cells."""
    names = [f"f{i}" for i in range(draw(st.integers(1, 3)))]
    if draw(st.booleans()):
        names.append("label")
    rows = draw(
        st.lists(st.lists(CELL, min_size=len(names), max_size=len(names)), min_size=1, max_size=4)
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(names)
    writer.writerows(rows)
    return buffer.getvalue()


COLUMN_TYPES = {  # arrow type: its cells
    pa.int64(): st.none() | st.integers(-(2**63), 2**63 - 1),
    pa.uint64(): st.integers(0, 2**64 - 1),
    pa.float64(): st.none() | st.floats(allow_nan=True, allow_infinity=True),
    pa.string(): st.none() | st.text(max_size=5),
    pa.bool_(): st.none() | st.booleans(),
}


@st.composite
def parquet_table(draw) -> pa.Table:
    """1-4 rows of 1-3 feature columns and maybe a label column, each of a random type."""
    rows = draw(st.integers(1, 4))
    names = [f"f{i}" for i in range(draw(st.integers(1, 3)))]
    if draw(st.booleans()):
        names.append("label")
    columns = {}
    for name in names:
        kind = draw(st.sampled_from(list(COLUMN_TYPES)))
        values = draw(st.lists(COLUMN_TYPES[kind], min_size=rows, max_size=rows))
        columns[name] = pa.array(values, type=kind)
    return pa.table(columns)


@PROPERTY_SETTINGS
@given(text=csv_text())
@example(text="f0,label\n1,5000\n2,1000000000000\n")  # two classes, not 10**12 + 1
@example(text="f0,label\n1,3\n2,\n3,nan\n")
def test_random_csv_cells_load_or_fail_in_one_line(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.csv"
        path.write_text(text, encoding="utf-8")
        source, loaded = load_everything(f"csv:{path}")
        if source is None:
            assert_one_line(loaded, str(path))
        else:
            check_batches(source, loaded)


@PROPERTY_SETTINGS
@given(table=parquet_table())
@example(table=pa.table({"f0": [1.0, None], "label": pa.array([2**63 + 5, 7], pa.uint64())}))
def test_random_parquet_cells_load_or_fail_in_one_line(table):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.parquet"
        pq.write_table(table, path)
        source, loaded = load_everything(f"parquet:{path}")
        if source is None:
            assert_one_line(loaded, str(path))
        else:
            check_batches(source, loaded)


# image files -------------------------------------------------------------------------

IMAGE_MODES = ["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F"]


def encoded(mode: str, width: int, height: int, seed: int, fmt: str) -> bytes:
    """A valid image file of ``mode`` with random pixels (F: some outside [0, 1])."""
    rng = np.random.default_rng(seed)
    shape = (height, width)
    if mode in ("L", "P", "1"):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        image = image.convert(mode) if mode != "L" else image
    elif mode in ("RGB", "RGBA", "LA"):
        bands = len(mode)
        image = Image.fromarray(rng.integers(0, 256, (*shape, bands), dtype=np.uint8), mode)
    elif mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(-5, 70000, shape, dtype=np.int32))
    else:
        image = Image.fromarray(rng.uniform(-0.5, 1.5, shape).astype(np.float32))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@st.composite
def image_file(draw) -> tuple[str, bytes]:
    """(suffix, content): random bytes, empty, a truncated or a valid PNG/TIFF of any mode."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "random", "empty", "truncated"]))
    if kind == "random":
        return ".png", draw(st.binary(max_size=48))
    if kind == "empty":
        return draw(st.sampled_from([".png", ".jpg"])), b""
    mode = draw(st.sampled_from(IMAGE_MODES))
    fmt = "TIFF" if mode in ("I", "F") else draw(st.sampled_from(["PNG", "PNG", "JPEG"]))
    if fmt == "JPEG" and mode not in ("L", "RGB"):
        fmt = "PNG"
    size = draw(st.integers(1, 12)), draw(st.sampled_from([4, 4, 7]))
    content = encoded(mode, *size, draw(st.integers(0, 2**16)), fmt)
    if kind == "truncated":
        content = content[: draw(st.integers(0, len(content) - 1))]
    return {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tiff"}[fmt], content


@st.composite
def image_folders(draw) -> tuple[list[tuple[str, bytes]], str]:
    """(files as (relative path, content), extra data spec options)."""
    files = []
    for i, (suffix, content) in enumerate(draw(st.lists(image_file(), min_size=1, max_size=4))):
        files.append((f"{'ab'[i % 2]}/{i}{suffix}", content))
    options = draw(st.sampled_from(["", ",image_size=4", ",image_mode=RGB", ",image_mode=L"]))
    return files, options


def write_files(root: Path, files: list[tuple[str, bytes]]) -> None:
    for name, content in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)


@PROPERTY_SETTINGS
@given(folder=image_folders())
@example(folder=([("a/0.png", b""), ("a/1.png", encoded("L", 4, 4, 0, "PNG"))], ""))
@example(folder=([("a/0.png", encoded("I;16", 4, 4, 0, "PNG"))], ",image_mode=RGB"))
def test_random_image_files_load_or_fail_in_one_line(folder):
    files, options = folder
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_files(root, files)
        source, loaded = load_everything(f"imagefolder:{root}{options}")
        if source is None:
            assert_one_line(loaded, str(root))
        else:
            assert source.kind == "image" and sum(len(x) for x, _, _ in loaded) == len(files)
            check_batches(source, loaded)


# through the command line ------------------------------------------------------------


@st.composite
def cli_data(draw) -> tuple[str, object]:
    """("csv", text), ("parquet", table) or ("images", folder)."""
    kind = draw(st.sampled_from(["csv", "parquet", "images"]))
    strategy = {"csv": csv_text(), "parquet": parquet_table(), "images": image_folders()}
    return kind, draw(strategy[kind])


def write_data(root: Path, kind: str, data) -> tuple[str, int]:
    """Write the data under ``root``; its DATA spec and its number of rows (files)."""
    root.mkdir()
    if kind == "csv":
        (root / "rows.csv").write_text(data, encoding="utf-8")
        return f"csv:{root / 'rows.csv'}", max(sum(1 for _ in csv.reader(io.StringIO(data))) - 1, 1)
    if kind == "parquet":
        pq.write_table(data, root / "rows.parquet")
        return f"parquet:{root / 'rows.parquet'}", data.num_rows
    files, options = data
    write_files(root, files)
    return f"imagefolder:{root}{options}", len(files)


@CLI_SETTINGS
@given(data=cli_data(), seed=st.integers(0, 2**16), out_exists=st.booleans())
@example(data=("images", ([("a/0.png", b"\x89PNG")], "")), seed=0, out_exists=False)
@example(data=("csv", "f0,label\n1,5000\n2,90000\n3,5000\n"), seed=0, out_exists=False)
def test_label_on_random_data_succeeds_or_fails_in_one_line_touching_nothing(
    data, seed, out_exists
):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec, rows = write_data(tmp / "data", *data)
        logits = tmp / "logits.npy"
        np.save(logits, np.random.default_rng(seed).normal(size=(rows, 2)).astype(np.float32))
        out = tmp / "out"
        if out_exists:  # an --out holding the user's own file: refused, left as it was
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        watched = [tmp / "data", logits, *([out] if out_exists else [])]
        before = tree_hash(*watched)
        result = CliRunner().invoke(
            build_cli(),
            ["label", "--teacher", f"logits:{logits}", "--data", spec, "--classes", "a,b",
             "--out", str(out)],
        )  # fmt: skip
        assert tree_hash(*watched) == before
        assert "Traceback" not in result.stderr
        event(f"{data[0]}: exit {result.exit_code}")
        if result.exit_code == 0:
            assert not out_exists
            assert (out / "report.json").is_file()
            return
        assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
        error = result.stderr[result.stderr.index("Error: ") :]
        assert error.endswith("\n") and error.count("\n") == 1, repr(error)
        assert out.exists() == out_exists
