"""The store's files and arrays: names, shapes and dtypes, shared by writer and reader.

::

    STORE/
      store.json            what the store holds (written last: a store without it is unfinished)
      cache.json            the identity of the `kdplug cache` run that writes it (for --resume)
      split-0/values.npy    [N, V, T, k] float16|float32: log-probabilities (top-k, or all C)
      split-0/indices.npy   [N, V, T, k] int16|int32: their class indices (top-k stores only)
      split-0/tail.npy      [N, V, T] float16|float32: log of the mass outside the top-k (idem)
      split-0/boxes.npy     [N, V, 4] float32: each view's crop box (x0, y0, x1, y1) in [0, 1]
      split-0/flips.npy     [N, V] bool: each view's flip
      split-0/seeds.npy     [N, V] int64: each view's seed (0: view 0, the plain input)
      split-0/bad.npy       [N, V] bool: a teacher gave NaN/Inf on that view (--skip-bad-rows)
      .shards/split-0/...   the shards while `kdplug cache` runs (kdplug.shards)

``N`` rows of the split, ``V`` views, ``T`` teachers, ``k`` the top-k (or ``C`` classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

STORE_FILE = "store.json"
RUN_FILE = "cache.json"
SHARDS = ".shards"
FORMAT = "kdplug-store"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")


def split_dir(index: int) -> str:
    return f"split-{index}"


def index_dtype(classes: int) -> np.dtype:
    """The narrowest integer type that holds every class index."""
    return np.dtype(np.int16) if classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def array_layout(info: dict[str, Any], rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of one split's arrays, from store.json's ``info``."""
    V, T, C = info["views"], len(info["teachers"]), len(info["classes"])
    width = info["topk"] or C
    layout = {"values": ((rows, V, T, width), np.dtype(info["dtype"]))}
    if info["topk"]:
        layout["indices"] = ((rows, V, T, width), index_dtype(C))
        layout["tail"] = ((rows, V, T), np.dtype(info["dtype"]))
    layout["boxes"] = ((rows, V, 4), np.dtype(np.float32))
    layout["flips"] = ((rows, V), np.dtype(bool))
    layout["seeds"] = ((rows, V), np.dtype(np.int64))
    layout["bad"] = ((rows, V), np.dtype(bool))
    return layout
