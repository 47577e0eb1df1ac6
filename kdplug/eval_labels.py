"""``--eval-labels``: the true label of each row of the data, from a file of labels.

The file needs only a label column (a labels-only CSV or parquet will do; a full copy of
the data too). Its rows are DATA's row for row, or, where it has a column named like one
of DATA's row keys (``file``, ``id``: ``kdplug.row_keys``), matched by that key: every key
once, each one a row of DATA (a ``file`` may also be the bare file name where DATA's file
names are distinct). Rows of DATA the file does not name have no true label.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kdplug.errors import UsageError
from kdplug.row_keys import key_columns, key_names

log = logging.getLogger("kdplug")

SHOWN = 5  # keys quoted in a message


def true_labels(spec: str, source: Any, classes: list[str], what: str = "DATA") -> np.ndarray:
    """``[N]`` int64 class ids (in ``classes``; -1 unknown) of ``source``'s rows from the
    labels in ``spec``; ``what`` names ``source`` in messages (``DATA``, ``--unlabeled``)."""
    from kdplug.data import open_dataset

    dataset, _, options, _ = open_dataset(spec)
    where = f"--eval-labels {spec}"
    column = label_column(dataset, options.get("label_column"), where)
    labels = class_ids(dataset, column, classes, where)
    keys = key_names(source)
    key = next((k for k in keys if _key_column(dataset, source, k)), None)
    if key is None:
        if len(dataset) != len(source):
            hint = f" (or give a {keys[0]!r} column to match rows by it)" if keys else ""
            raise UsageError(
                f"{where} has {len(dataset)} rows, {what} has {len(source)}; they must match "
                f"row for row{hint}"
            )
        return labels
    return keyed(dataset, _key_column(dataset, source, key), source, key, labels, where, what)


def label_column(dataset: Any, wanted: str | None, where: str) -> str:
    """The labels' column: ``label_column=NAME``, else a ClassLabel, else ``label(s)``."""
    from datasets import ClassLabel

    from kdplug.data import LABEL_NAMES, pick_column

    found = pick_column(dataset.features, wanted, ClassLabel, LABEL_NAMES, "label", where)
    if found is None:
        raise UsageError(f"{where} has no label column (columns: {list(dataset.features)})")
    return found


def class_ids(dataset: Any, column: str, classes: list[str], where: str) -> np.ndarray:
    """The label column as ids in ``classes`` (-1: no label); a class name that is not one
    of ``classes`` is refused, naming it."""
    from datasets import ClassLabel

    from kdplug.data import distinct_labels, unique_values, value_positions

    feature = dataset.features[column]
    if isinstance(feature, ClassLabel):
        position = np.asarray(dataset.with_format("numpy")[column], dtype=np.int64)
        used = np.unique(position[position >= 0])
        names = list(feature.names)
        unknown = [names[i] for i in used if names[i] not in classes]
    else:
        present = distinct_labels(unique_values(dataset, column), where, column)
        names = [str(v) for v in present]
        lookup = {v: i for i, v in enumerate(present)}
        position = value_positions(dataset.with_format("arrow")[column], lookup)
        if position is None:  # values Arrow cannot match: one by one
            row_values = dataset[column]
            position = np.asarray([_position(lookup, v) for v in row_values], dtype=np.int64)
        unknown = [n for n in names if n not in classes]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:SHOWN])
        more = f" and {len(unknown) - SHOWN} more" if len(unknown) > SHOWN else ""
        raise UsageError(
            f"{where}: class names not in the run's classes: {shown}{more} (classes: "
            f"{', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})"
        )
    at = {name: i for i, name in enumerate(classes)}
    index = np.asarray([at.get(n, -1) for n in names] + [-1], dtype=np.int64)
    return index[np.where(position < 0, -1, position)]


def _position(lookup: dict[Any, int], value: Any) -> int:
    """A label value's position among the column's classes (-1: none, NaN or -1)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return lookup.get(value, -1) if value is not None else -1


def _key_column(dataset: Any, source: Any, key: str) -> str | None:
    """The column of the labels that holds ``key`` (``file``; ``id`` or DATA's id column)."""
    names = [key] + ([source.id_column] if key == "id" else [])
    return next((n for n in names if n in dataset.features), None)


def keyed(
    dataset: Any,
    column: str,
    source: Any,
    key: str,
    labels: np.ndarray,
    where: str,
    what: str,
) -> np.ndarray:
    """``labels`` (one per row of the labels) spread onto ``source``'s rows by ``key``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    given = pc.cast(
        dataset.select_columns([column]).with_format("arrow")[:].column(column), pa.string()
    ).combine_chunks()
    if given.null_count or pc.any(pc.equal(given, "")).as_py():
        row = _first(pc.or_kleene(pc.is_null(given), pc.equal(given, "")))
        raise UsageError(f"{where}: row {row} has no {column!r}")
    counts = pc.value_counts(given)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(repeated):
        raise UsageError(f"{where}: {column!r} values repeat: {_quoted(repeated)}")
    ours = key_columns(source, 0, len(source), [key])[key]
    bare = not pc.any(pc.match_substring_regex(given, r"[/\\]")).as_py()
    if key == "file" and bare and not pc.any(pc.is_in(given, value_set=ours)).as_py():
        ours = _bare_names(ours) or ours
    unknown = given.filter(pc.invert(pc.is_in(given, value_set=ours)))
    if len(unknown):
        raise UsageError(
            f"{where}: {len(unknown)} {column!r} value(s) name no row of {what}: "
            f"{_quoted(unknown)} (row 0 of {what} is {key} {ours[0].as_py()!r})"
        )
    rows = pc.index_in(ours, value_set=given).to_numpy(zero_copy_only=False)
    found = ~np.isnan(rows.astype(np.float64))
    truth = np.full(len(source), -1, dtype=np.int64)
    truth[found] = labels[rows[found].astype(np.int64)]
    if not found.all():
        log.info(
            "%s names %d of the %d rows of %s by %s; the other rows have no true label",
            where,
            int(found.sum()),
            len(source),
            what,
            key,
        )
    return truth


def _bare_names(paths: Any) -> Any:
    """``paths`` cut to their file names, where those are distinct; else None."""
    import pyarrow.compute as pc

    names = pc.replace_substring_regex(paths, pattern=r"^.*[/\\]", replacement="")
    return names if pc.count_distinct(names).as_py() == len(names) else None


def _first(mask: Any) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _quoted(values: Any) -> str:
    shown = ", ".join(repr(v) for v in values[:SHOWN].to_pylist())
    return shown + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")
