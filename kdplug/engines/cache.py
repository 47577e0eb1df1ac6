"""The cache engine (``kdplug cache``): every teacher once over every view of every row.

1. For each DATA (a split) the rows are cut into shards (fixed row ranges,
   kdplug.shards). A shard draws its views' parameters from a generator seeded by
   ``(seed, split, first row)``, rebuilds the views (kdplug.augment_views), runs the
   teachers on each and keeps their log-probabilities (top-k, or all classes); it is
   written atomically to ``STORE/.shards/split-I/``. ``--resume`` skips every finished
   shard, whichever process wrote it; under torch.distributed (``kdplug.distributed``)
   rank ``r`` takes shards ``r, r + world, ...`` (of all splits' shards in order) that are
   not finished yet.
2. The main process joins each split's shards into memory-mappable ``.npy`` arrays
   (``STORE/split-I/``, each directory renamed into place whole), then writes
   ``store.json`` last: a store without it is unfinished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug import __version__, distributed
from kdplug.augment_views import ViewAugment, parse_view_augment, rebuild_views, sample_views
from kdplug.data import DataSource, batches, index_batches, load_data
from kdplug.device import autocast, pick_device
from kdplug.errors import UsageError
from kdplug.file_hashes import file_hash
from kdplug.ops import IMPOSSIBLE, masked_log_softmax
from kdplug.outputs import (
    atomic_path,
    discarding_unstarted_runs,
    input_paths,
    prepare_out_dir,
    versions,
    write_json,
)
from kdplug.shards import Shard, is_finished, plan_shards, read_shard, write_shard
from kdplug.store.layout import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    RUN_FILE,
    SHARDS,
    STORE_FILE,
    array_layout,
    index_dtype,
    split_dir,
)
from kdplug.store.topk import top_k_entries
from kdplug.teachers import TeacherSet, build_teacher_set, create_teachers, run_classes


@dataclass
class CacheConfig:
    """Everything ``kdplug cache`` takes; ``batch_size``, ``device``, ``progress``, ``resume``,
    ``overwrite`` and ``force`` may change when a run is resumed, the rest may not."""

    teachers: list[str]
    data: list[str]
    out: str
    topk: int | None = None
    views: int = 1
    augment: str | None = None
    dtype: str = "float16"
    seed: int = 0
    calibration: str | None = None
    classes: list[str] | None = None
    skip_bad_rows: bool = False
    shard_size: int = 4096
    batch_size: int = 256
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    force: bool = False
    progress: bool = True


@discarding_unstarted_runs()
def run_cache(cfg: CacheConfig) -> dict[str, Any]:
    """Cache the teachers' outputs on ``cfg.data`` into ``cfg.out``; return store.json's content."""
    augment = check_config(cfg)
    first = load_first(cfg)  # a missing or repeated DATA fails before any model loads
    teachers = create_teachers(cfg.teachers)
    sources = load_splits(cfg, first, teachers)
    teacher_set = build_teacher_set(
        cfg.teachers, sources[0].classes, cfg.calibration, cfg.skip_bad_rows, sources[0], teachers
    )
    check_teacher_inputs(cfg, teacher_set, sources)
    record = cache_record(cfg, sources, teacher_set, augment)
    record, forced = resumed_record(cfg, record)
    if distributed.is_main():
        prepare_out_dir(
            cfg.out,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            marker=RUN_FILE,
            config=record,
            inputs=[*cfg.teachers, *cfg.data, cfg.calibration],
        )
    distributed.barrier()
    out = Path(cfg.out)
    if (out / STORE_FILE).exists():  # a finished store, resumed: nothing left to do
        return json.loads((out / STORE_FILE).read_text())

    device = pick_device(cfg.device)
    teacher_set.to(device)
    plans = [
        plan_shards(len(source), cfg.shard_size, out / SHARDS / split_dir(i))
        for i, source in enumerate(sources)
    ]
    every = [(i, shard) for i, shards in enumerate(plans) for shard in shards]
    mine = every[distributed.rank() :: distributed.world_size()]
    mine = [pair for pair in mine if not is_finished(pair[1])]
    cache_shards(sources, mine, teacher_set, record, augment, cfg, device)
    distributed.barrier()
    if not distributed.is_main():
        return record
    info = store_info(record, forced)
    for i, shards in enumerate(plans):
        bad = merge_split(out / split_dir(i), shards, array_layout(info, len(sources[i])))
        info["splits"][i]["bad_views"] = bad
    write_json(out / STORE_FILE, info)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    return info


def check_config(cfg: CacheConfig) -> ViewAugment | None:
    """Refuse out-of-range options; the views' augmentation (None with one view)."""
    for key, low in (("views", 1), ("shard_size", 1), ("batch_size", 1), ("seed", 0)):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(
                f"--{key.replace('_', '-')} must be an integer >= {low}, got {value!r}"
            )
    if cfg.topk is not None and (isinstance(cfg.topk, bool) or cfg.topk < 1):
        raise UsageError(f"--topk must be an integer >= 1, got {cfg.topk!r}")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if not cfg.teachers:
        raise UsageError("no teacher given (use --teacher SPEC)")
    if not cfg.data:
        raise UsageError("no data given (use --data DATA)")
    if cfg.views == 1:
        if cfg.augment is not None:
            raise UsageError("--augment needs --views 2 or more (view 0 is the plain input)")
        return None
    return parse_view_augment(cfg.augment)


def load_first(cfg: CacheConfig) -> DataSource:
    """The first DATA (in ``--classes`` where given), once every DATA is known distinct."""
    if len(set(cfg.data)) != len(cfg.data):
        raise UsageError("the same --data is given twice")
    return load_data(cfg.data[0], cfg.classes)


def load_splits(cfg: CacheConfig, first: DataSource, teachers: list[Any]) -> list[DataSource]:
    """Each DATA as a source in the run's classes (``--classes``, else the first DATA's,
    else the teachers' own: ``kdplug.teachers.run_classes``)."""
    classes, _ = run_classes(cfg.classes, first, teachers, cfg.teachers)
    sources = [first.with_classes(classes)]
    sources += [load_data(spec, list(classes)) for spec in cfg.data[1:]]
    for source in sources:
        if cfg.views > 1 and source.kind != "image":
            raise UsageError(f"{source.spec} is tabular: augmented views (--views > 1) need images")
    if cfg.topk is not None and cfg.topk >= len(classes):
        raise UsageError(
            f"--topk {cfg.topk} keeps every one of the {len(classes)} classes; leave --topk out "
            "to store all classes"
        )
    return sources


def check_teacher_inputs(
    cfg: CacheConfig, teacher_set: TeacherSet, sources: list[DataSource]
) -> None:
    """Row-indexed teachers (precomputed logits) see no views and fit one row count."""
    for teacher, name in zip(teacher_set.teachers, teacher_set.specs):
        if cfg.views > 1 and getattr(teacher, "uses_row_index", False):
            raise UsageError(
                f"teacher {name} serves precomputed outputs by row and cannot see augmented "
                "views; use --views 1 with it"
            )
    for source in sources:
        teacher_set.check_data(source)


def teacher_files(spec: str) -> dict[str, str]:
    """``{absolute path: file hash}`` of the files a teacher spec names (its REF and option
    values that are existing paths): what ``Store.check_teachers`` re-hashes later."""
    paths = {path.resolve() for path in input_paths([spec])}
    return {str(path): file_hash(path) for path in sorted(paths) if path.exists()}


def cache_record(
    cfg: CacheConfig,
    sources: list[DataSource],
    teacher_set: TeacherSet,
    augment: ViewAugment | None,
) -> dict[str, Any]:
    """The store's identity: what a resumed run must match (cache.json, then store.json)."""
    known = teacher_set.known
    return {
        "classes": list(teacher_set.classes),
        "teachers": [
            {
                "spec": spec,
                "name": name,
                "fingerprint": fingerprint,
                "files": teacher_files(spec),
                "temperature": temperature,
                "unknown_classes": (~known[k]).nonzero().flatten().tolist(),
            }
            for k, (spec, name, fingerprint, temperature) in enumerate(
                zip(
                    teacher_set.specs,
                    teacher_set.names,
                    teacher_set.fingerprints(),
                    teacher_set.temperatures,
                )
            )
        ],
        "splits": [
            {
                "data": source.spec,
                "fingerprint": source.fingerprint,
                "rows": len(source),
                "input_shape": list(source.input_shape),
            }
            for source in sources
        ],
        "topk": cfg.topk,
        "views": cfg.views,
        "dtype": cfg.dtype,
        "values": "log-probabilities",
        "augment": augment.as_dict() if augment is not None else None,
        "seed": cfg.seed,
        "calibration": cfg.calibration,
        "skip_bad_rows": cfg.skip_bad_rows,
        "shard_size": cfg.shard_size,
    }


def resumed_record(cfg: CacheConfig, record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The record to resume under and what was forced.

    Resuming after a teacher file or a DATA changed is refused (the finished shards came
    from the old ones) unless ``--force``: then the run continues under its stored record,
    and store.json lists what changed under ``forced``.
    """
    stored_file = Path(cfg.out) / RUN_FILE
    if not (cfg.resume and stored_file.is_file()):
        return record, []
    try:
        stored = json.loads(stored_file.read_text())["config"]
    except (ValueError, KeyError):
        return record, []  # prepare_out_dir names the damaged run
    changes = changed_inputs(stored, record)
    if not changes:
        return record, []
    if not cfg.force:
        raise UsageError(
            f"{changes[0]} since the shards in {cfg.out} were cached; start over with "
            "--overwrite, or pass --force to keep the finished shards"
        )
    return stored, changes


def changed_inputs(stored: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """What changed between two records that differ only in teacher files or data
    fingerprints (one sentence each); [] when they differ in anything else too."""

    def without_hashes(rec: dict[str, Any]) -> dict[str, Any]:
        rec = json.loads(json.dumps(rec))
        for teacher in rec.get("teachers", []):
            teacher.pop("fingerprint", None), teacher.pop("files", None)
        for split in rec.get("splits", []):
            split.pop("fingerprint", None)
        return rec

    if stored == record or without_hashes(stored) != without_hashes(record):
        return []
    changes = []
    for old, new in zip(stored["teachers"], record["teachers"]):
        if (old["fingerprint"], old["files"]) != (new["fingerprint"], new["files"]):
            changes.append(f"teacher {new['spec']} has changed")
    for old, new in zip(stored["splits"], record["splits"]):
        if old["fingerprint"] != new["fingerprint"]:
            changes.append(f"data {new['data']} has changed")
    return changes


def cache_shards(
    sources: list[DataSource],
    shards: list[tuple[int, Shard]],
    teacher_set: TeacherSet,
    record: dict[str, Any],
    augment: ViewAugment | None,
    cfg: CacheConfig,
    device: torch.device,
) -> None:
    """Compute and write ``shards`` (``(split index, shard)`` pairs) one after the other."""
    from kdplug.progress import Progress

    total = sum(math.ceil((s.stop - s.start) / cfg.batch_size) for _, s in shards)
    show = cfg.progress and distributed.is_main()  # one progress bar: rank 0's
    with Progress("cache", total, show=show) as bar:
        for i, shard in shards:
            tensors = cache_rows(sources[i], i, shard, teacher_set, record, augment, cfg, device)
            write_shard(shard, tensors)
            rows = shard.stop - shard.start
            bar.update(math.ceil(rows / cfg.batch_size), rows=rows)


@torch.inference_mode()
def cache_rows(
    source: DataSource,
    split: int,
    shard: Shard,
    teacher_set: TeacherSet,
    record: dict[str, Any],
    augment: ViewAugment | None,
    cfg: CacheConfig,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The arrays of one shard (see kdplug.store.layout), its ``R`` rows first."""
    R, V = shard.stop - shard.start, cfg.views
    height, width = source.input_shape[-2:] if source.kind == "image" else (1, 1)
    rng = np.random.default_rng([cfg.seed, split, shard.start])
    params = sample_views(augment or ViewAugment(), R, V, height, width, rng)
    boxes, flips = torch.from_numpy(params.boxes), torch.from_numpy(params.flips)
    seeds = torch.from_numpy(params.seeds)
    index_type = getattr(torch, index_dtype(len(record["classes"])).name)
    parts: dict[str, list[torch.Tensor]] = {}
    for x, idx in shard_batches(source, shard, teacher_set, cfg, device):
        local = idx - shard.start
        views = []
        for v in range(V):
            view = x
            if v > 0:
                view = rebuild_views(x, boxes[local, v], flips[local, v], seeds[local, v], augment)
            views.append(view_entries(teacher_set, view, idx, cfg, index_type, device))
        for name in views[0]:  # each [b, V, ...]
            parts.setdefault(name, []).append(torch.stack([view[name] for view in views], 1))
    tensors = {name: torch.cat(chunks) for name, chunks in parts.items()}
    tensors.update(boxes=boxes, flips=flips, seeds=seeds)
    return tensors


def reads_inputs(teacher_set: TeacherSet, views: int) -> bool:
    """Whether a teacher looks at the inputs: every teacher but those serving precomputed
    outputs by row (``uses_inputs = False``, e.g. ``logits:`` and ``store:``), and all of
    them when views are cached."""
    return views > 1 or teacher_set.reads_inputs


def shard_batches(
    source: DataSource,
    shard: Shard,
    teacher_set: TeacherSet,
    cfg: CacheConfig,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, idx)`` batches of a shard's rows. When no teacher reads the inputs they are not
    decoded: ``x`` is a zero tensor of the inputs' shape on ``device`` that takes no memory
    (one element, broadcast), so caching precomputed outputs costs what reading them does."""
    if reads_inputs(teacher_set, cfg.views):
        pin = device.type == "cuda"
        for x, _, idx in batches(source, cfg.batch_size, indices=list(shard.rows), pin_memory=pin):
            yield x, idx
        return
    for x, _, idx in index_batches(source, [shard.rows], cfg.batch_size, device):
        yield x, idx


def view_entries(
    teacher_set: TeacherSet,
    x: torch.Tensor,
    idx: torch.Tensor,
    cfg: CacheConfig,
    index_type: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """What the store keeps of the teachers' outputs on one view ``x`` of a batch, on the CPU:
    ``values [b, T, k]`` (``indices [b, T, k]`` and ``tail [b, T]`` for top-k), ``bad [b]``."""
    with autocast(device):
        out = teacher_set(x.to(device), idx)  # row positions stay on the host
    known = None if bool(out.known.all()) else out.known  # None: no class to mask
    log_probs = masked_log_softmax(out.logits.float(), known)
    dtype = getattr(torch, cfg.dtype)
    entries = {}
    if cfg.topk is None:
        entries["values"] = log_probs.clamp_min(2 * IMPOSSIBLE).permute(1, 0, 2).to(dtype)
    else:
        values, indices, tail = top_k_entries(log_probs, cfg.topk)
        entries["values"] = values.permute(1, 0, 2).to(dtype)
        entries["indices"] = indices.permute(1, 0, 2).to(index_type)
        entries["tail"] = tail.permute(1, 0).to(dtype)
    bad = out.bad_rows
    entries["bad"] = bad if bad is not None else torch.zeros(len(x), dtype=torch.bool)
    return {name: tensor.cpu() for name, tensor in entries.items()}


def store_info(record: dict[str, Any], forced: list[str]) -> dict[str, Any]:
    """store.json's content: the format, the record, the splits' names, versions."""
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "kdplug_version": __version__}
    info.update(json.loads(json.dumps(record)))
    for i, split in enumerate(info["splits"]):
        split["name"] = split_dir(i)
    if forced:
        info["forced"] = forced
    info["versions"] = versions()
    return info


def merge_split(
    directory: Path, shards: list[Shard], layout: dict[str, tuple[tuple[int, ...], np.dtype]]
) -> int:
    """Join a split's shards into one ``.npy`` file per array, written to a temporary
    directory renamed to ``directory`` whole; returns the number of bad views."""
    bad = 0
    with atomic_path(directory, directory=True) as tmp:
        arrays = {
            name: np.lib.format.open_memmap(
                tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape
            )
            for name, (shape, dtype) in layout.items()
        }
        for name in arrays:
            allocate(tmp / f"{name}.npy")
        for shard in shards:
            tensors = read_shard(shard)
            for name, array in arrays.items():
                array[shard.start : shard.stop] = tensors[name].numpy()
            bad += int(tensors["bad"].sum())
        for array in arrays.values():
            array.flush()
        del arrays
    return bad


def allocate(path: Path) -> None:
    """Reserve the disk space of a sparse file (``open_memmap``'s) before it is written, so a
    full disk is an OSError here instead of a SIGBUS when the memory map is filled."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
