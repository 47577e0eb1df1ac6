"""Row shards of a long run: fixed row ranges, each written atomically as its own file.

Shard ``i`` covers rows ``[i * size, min((i + 1) * size, rows))`` and is stored as one
safetensors file named by its range. A file is only ever renamed into place complete, so
any process (another rank, a resumed run) can tell a finished shard by its file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kdplug.outputs import atomic_path


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of the data, stored at ``path``."""

    index: int
    start: int
    stop: int
    path: Path

    @property
    def rows(self) -> range:
        return range(self.start, self.stop)


def plan_shards(rows: int, size: int, directory: str | Path) -> list[Shard]:
    """The shards covering ``rows`` rows, ``size`` rows each (the last may be shorter)."""
    shards = []
    for index, start in enumerate(range(0, rows, size)):
        stop = min(start + size, rows)
        name = f"rows-{start:010d}-{stop:010d}.safetensors"
        shards.append(Shard(index, start, stop, Path(directory) / name))
    return shards


def write_shard(
    shard: Shard, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write the shard's tensors (first dim or second dim sized to its rows) atomically,
    with ``metadata`` (text) beside its range."""
    from safetensors.torch import save

    meta = {**(metadata or {}), "start": str(shard.start), "stop": str(shard.stop)}
    data = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    with atomic_path(shard.path) as tmp:
        # bytes written by Python: a full disk is an OSError that atomic_path reports
        # (safetensors' save_file raises SafetensorError, which escaped as a traceback)
        tmp.write_bytes(data)


def is_finished(shard: Shard) -> bool:
    """Whether the shard's file exists, is readable and covers the shard's rows."""
    if not shard.path.is_file():
        return False
    try:
        meta = read_shard_metadata(shard)
    except Exception:  # a foreign or damaged file: the shard is redone
        return False
    return meta.get("start") == str(shard.start) and meta.get("stop") == str(shard.stop)


def read_shard(shard: Shard, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (None: all) of a finished shard."""
    from safetensors import safe_open

    with safe_open(str(shard.path), framework="pt") as fh:
        return {key: fh.get_tensor(key) for key in (fh.keys() if keys is None else keys)}


def read_shard_metadata(shard: Shard) -> dict[str, str]:
    """The metadata a finished shard was written with."""
    from safetensors import safe_open

    with safe_open(str(shard.path), framework="pt") as fh:
        return dict(fh.metadata() or {})
