"""What a user finds a row by besides its position: ``file``, the path of the image the row
was read from (relative to the data's folder where it lies under it: ``cat/0.png`` for
``imagefolder:pets``), and ``id``, the column that ``id_column=NAME`` names on the data spec.

Both are read as Arrow columns, one range of rows at a time (no per-row Python): the
``file`` of an image is the ``path`` that datasets keeps next to its bytes.
"""

from __future__ import annotations

import os
from typing import Any

KEYS = ("file", "id")


def key_names(source: Any) -> list[str]:
    """The keys ``source`` has: ``file`` (images read from files), ``id`` (``id_column``)."""
    names = []
    if source.kind == "image" and _paths(source, 0, 1) is not None:
        names.append("file")
    if source.id_column is not None:
        names.append("id")
    return names


def key_columns(source: Any, start: int, stop: int, names: list[str]) -> dict[str, Any]:
    """Rows ``start..stop-1``'s keys ``names`` as Arrow string arrays."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = {}
    if "file" in names:
        columns["file"] = _relative(_paths(source, start, stop), source.root)
    if "id" in names:
        values = _column(source.dataset, source.id_column, start, stop)
        columns["id"] = pc.cast(values, pa.string())
    return columns


def _paths(source: Any, start: int, stop: int) -> Any:
    """The ``path`` of each image of rows ``start..stop-1`` (None where the data keeps none)."""
    import pyarrow as pa

    column = _column(source.dataset, source.input_columns[0], start, stop)
    kind = column.type
    if not pa.types.is_struct(kind) or kind.get_field_index("path") < 0:
        return None
    paths = column.flatten()[kind.get_field_index("path")]
    return None if paths.null_count == len(paths) else paths


def _column(dataset: Any, name: str, start: int, stop: int) -> Any:
    """One column of rows ``start..stop-1`` as one Arrow array, as stored (not decoded)."""
    table = dataset.select_columns([name]).with_format("arrow")[start:stop]
    return table.column(name).combine_chunks()


def _relative(paths: Any, root: str | None) -> Any:
    """``paths`` under the folder ``root`` made relative to it; others as they are."""
    import pyarrow.compute as pc

    if root is None:
        return paths
    prefix = root.rstrip(os.sep) + os.sep
    under = pc.starts_with(paths, prefix)
    return pc.if_else(under, pc.utf8_slice_codeunits(paths, len(prefix)), paths)
