"""The labeling engine: teachers over DATA in shards, then the generator shard by shard.

1. Each shard (a fixed row range, kdplug.shards) runs the teachers batch by batch and is
   written atomically to ``OUT/.shards/``: the combined prediction ``[R, C]``
   (``kdplug.fitting.combined_prediction``, stored as ``target``), each teacher's vote and
   weight ``[K, R]``, the bad-row mask ``[R]`` and, for a generator that asks for them
   (``teacher_probs = True``), the teachers' probabilities ``[K, R, C]``.
   ``resume`` skips every finished shard, whichever process wrote it. Under
   torch.distributed (``kdplug.distributed``) rank ``r`` of ``W`` takes the unfinished shards
   ``r, r + W, ...``; a lost rank's shards are redone on ``--resume`` by any number of ranks.
2. Rank 0 streams over the shards (``kdplug.label_shards``): the generator's ``prepare``,
   then its ``decide`` per shard, whose rows go straight into the labeled dataset
   (``kdplug.label_dataset``) and the report's tally: memory is bounded by a shard, not N.
3. The labeled dataset, ``report.json`` and ``report.png`` are built in a temporary
   directory that replaces ``OUT`` whole, so an interrupted run never looks complete.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug import distributed, eval_labels, teacher_checks
from kdplug.data import (
    DataSource,
    batch_count,
    batches,
    default_workers,
    index_batches,
    load_data,
)
from kdplug.device import autocast, pick_device
from kdplug.errors import PluginError, UsageError, component_name, running
from kdplug.file_hashes import PENDING, deferred_hashes
from kdplug.fitting import (
    calibration_rows,
    can_fit,
    combined_prediction,
    fit_on_rows,
    invalid_rows,
)
from kdplug.label_dataset import (
    DatasetWriter,
    arrow_table,
    describe_mode,
    probs_mode,
    shard_columns,
)
from kdplug.label_dataset import features as label_features
from kdplug.label_shards import LabelShards, ShardRows, shape_problem, streaming
from kdplug.ops import argmax, teacher_probs
from kdplug.outputs import (
    atomic_path,
    discarding_unstarted_runs,
    prepare_out_dir,
    write_json,
    write_run_config,
)
from kdplug.plugins import create, get_manager
from kdplug.registry import typed_options
from kdplug.reports.label import LabelTally, save_report_figure
from kdplug.row_keys import key_columns, key_names
from kdplug.run import Run, check_tensorboard
from kdplug.shards import (
    Shard,
    is_finished,
    plan_shards,
    read_shard,
    read_shard_metadata,
    write_shard,
)
from kdplug.spec import Spec, parse_spec
from kdplug.teachers import TeacherSet, build_teacher_set, create_teachers, run_classes

log = logging.getLogger("kdplug")

MARKER = "run.json"
SHARDS = ".shards"
PROBS_KEY = "teacher_probs"  # shard metadata: whether it holds the teachers' probabilities
COLUMN_THREADS = 2  # threads making the labeled dataset's columns (torch and numpy free the GIL)


@dataclass
class LabelConfig:
    """Everything ``kdplug label`` takes. A resumed run must match what the shards depend
    on (see ``run_record``); the generator, batch size, device and outputs may change."""

    teachers: list[str | Spec]  # spec text as a user writes it, or an engine's Spec.of
    data: str
    out: str
    combiner: str | Spec | None = None  # auto with calibration_data, else mean
    generator: str = "threshold,floor=0.25"  # FixMatch's tau = 0.95, no class left empty
    calibration: str | None = None
    batch_size: int = 256
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    shard_size: int = 8192
    with_inputs: bool = False
    eval_labels: str | None = None
    classes: list[str] | None = None
    skip_bad_rows: bool = False
    progress: bool = True
    calibration_data: str | None = None  # labeled rows a combiner with fit (auto) is fitted on
    probs: str = "auto"  # how each row's soft label is written (kdplug.label_dataset)
    tensorboard: str | None = None  # a directory for the tensorboard plugin (run.options)


@discarding_unstarted_runs()
def run_label(cfg: LabelConfig) -> dict[str, Any]:
    """Label ``cfg.data`` into ``cfg.out``; return the report (also in ``OUT/report.json``).

    On a non-zero rank of a distributed run: ``{"rank", "labeled_rows"}`` of its own shards."""
    started = time.perf_counter()
    if cfg.shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {cfg.shard_size}")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if cfg.tensorboard is not None:
        check_tensorboard()
    if cfg.combiner is None:
        cfg.combiner = "auto" if cfg.calibration_data else "mean"
    combiner = create("combiners", cfg.combiner)
    made = create("label-generators", cfg.generator)
    generator = streaming(made)  # a version-1 generator runs through AllRows
    keep_probs = bool(getattr(generator, "teacher_probs", False))
    source = load_data(cfg.data, cfg.classes)
    teachers = create_teachers(cfg.teachers)
    classes, classes_from = run_classes(cfg.classes, source, teachers, cfg.teachers)
    truth = true_labels(cfg, source, classes)
    teacher_set = build_teacher_set(
        cfg.teachers, classes, cfg.calibration, cfg.skip_bad_rows, source, teachers
    )
    teacher_set.check_data(source)
    calibration_rows = calibration_source(cfg, classes, teacher_set)
    pick_rows = generator_fit_rows(generator, cfg.generator, source, calibration_rows)
    with deferred_hashes(enabled=not cfg.resume):  # a new run need not wait for them
        record = run_record(cfg, source, classes, teacher_set)
    record["calibration_data"] = describe_source(calibration_rows, cfg.calibration_data)
    settings = output_settings(cfg)
    out = Path(cfg.out)
    if distributed.is_main():
        if cfg.resume:
            refuse_unfingerprinted(out)
        prepare_out_dir(
            out,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            marker=MARKER,
            config=record,
            inputs=[
                *map(str, cfg.teachers),
                cfg.data,
                cfg.calibration,
                cfg.eval_labels,
                cfg.calibration_data,
            ],
        )
    distributed.barrier()
    if (out / "report.json").exists():
        return finished_report(out, settings)

    device = pick_device(cfg.device)
    teacher_set.to(device)
    fitted = fit_combiner(combiner, teacher_set, calibration_rows, cfg.batch_size, device)
    shards = plan_shards(len(source), cfg.shard_size, out / SHARDS)
    todo = [s for s in shards if not is_finished(s)]
    distributed.barrier()  # every rank has its todo list before any rank adds a shard
    mine = todo[distributed.rank() :: distributed.world_size()]
    show = cfg.progress and distributed.is_main()

    def fingerprints_done(wait: bool = False) -> None:
        if distributed.is_main() and fill_fingerprints(record, teacher_set, wait):
            write_run_config(out, MARKER, record)

    label_shards(
        source,
        teacher_set,
        combiner,
        mine,
        cfg.batch_size,
        device,
        show,
        keep_probs,
        after_shard=fingerprints_done,
    )
    fingerprints_done(wait=True)
    distributed.barrier()
    if not distributed.is_main():
        return {"rank": distributed.rank(), "labeled_rows": sum(len(s.rows) for s in mine)}
    reader = ShardReader(shards, teacher_set.known.cpu(), keep_probs)
    survey = reader.survey(None if pick_rows is None or pick_rows.source else pick_rows.rows)
    checks = check_label_teachers(teacher_set, survey, truth, calibration_rows, cfg, device)
    where = (combiner, fitted, teacher_set, cfg.batch_size, device)
    picked = fit_generator(generator, cfg.generator, pick_rows, survey, *where)
    name = f"label generator {cfg.generator!r}"
    during = " while preparing over the shards" if generator is made else ""  # v1: its call
    with running(generator, name, during):
        generator.prepare(reader.label_shards(survey))
    mode, k = probs_mode(cfg.probs, getattr(generator, "topk", None), len(classes))
    labeled_rows = sum(s.stop - s.start for s in todo)
    with atomic_path(out, directory=True) as tmp:
        tally = write_dataset(
            tmp,
            reader,
            generator,
            name,
            source,
            cfg.with_inputs,
            classes,
            (mode, k),
            truth,
        )
        with running(generator, name, " in its summary"):
            info = dict(generator.summary() or {})
        report = tally.report(
            record=record,
            settings=settings,
            info=info,
            generator_options=generator_options(cfg.generator),
            seconds=time.perf_counter() - started,
            labeled_rows=labeled_rows,
        )
        report["probs"] = {"spec": cfg.probs, "written": describe_mode(mode, k)}
        report["fitted"] = fitted
        report["generator"]["fit"] = picked
        report["generator"]["contract"] = 2 if generator is made else 1
        report["classes_from"] = classes_from
        report["teacher_checks"] = checks
        write_json(tmp / "report.json", report)
        save_report_figure(report, tmp / "report.png")
        shutil.copy2(out / MARKER, tmp / MARKER)
    run = Run(
        {**record, **settings},
        out,
        {"shards": len(shards), "labeled_this_time": labeled_rows},
        options={"tensorboard": cfg.tensorboard},
    )
    get_manager().notify("on_labels_written", run=run, path=str(out), report=report)
    return report


def calibration_source(
    cfg: LabelConfig, classes: list[str], teacher_set: TeacherSet
) -> DataSource | None:
    """``--calibration-data``: labeled rows in the run's classes, or None."""
    if not cfg.calibration_data:
        return None
    return calibration_rows(cfg.calibration_data, classes, teacher_set, "DATA")


def describe_source(source: DataSource | None, spec: str | None) -> dict[str, Any] | None:
    if source is None:
        return None
    labeled = int((source.labels() >= 0).sum())
    return {
        "spec": spec,
        "fingerprint": source.fingerprint,
        "labeled_rows": labeled,
        "split": source.split,
    }


def fit_combiner(
    combiner: Any,
    teacher_set: TeacherSet,
    rows: DataSource | None,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Fit a combiner that has ``fit`` (``auto``) on the teachers' outputs for the labeled
    calibration rows (none without ``--calibration-data``, or where the teachers look
    trained on them: ``kdplug.fitting.fit_components`` then says what it does instead).
    Every rank calls it: each runs the teachers on its share of the rows (``shared``)."""
    if not can_fit(combiner):
        if rows is not None:
            log.warning("--calibration-data is unused: this combiner has no fit step")
        return {}
    labeled = [] if rows is None else np.flatnonzero(rows.labels() >= 0).tolist()
    names = "labeled --calibration-data rows"
    return fit_on_rows(
        combiner, None, teacher_set, rows, labeled, batch_size, device, names, shared=True
    )


def check_label_teachers(
    teacher_set: TeacherSet,
    survey: Survey,
    truth: np.ndarray | None,
    calibration_rows: DataSource | None,
    cfg: LabelConfig,
    device: torch.device,
) -> dict[str, Any]:
    """``kdplug.teacher_checks`` on DATA's rows (near chance on those with a label in DATA
    or ``--eval-labels``, disagreement on all), else near chance on the labeled
    ``--calibration-data`` rows; the report's ``teacher_checks``."""
    labels = None if truth is None else torch.from_numpy(truth)[survey.good]
    known = teacher_set.known.cpu()
    held_out, fine = [], set()
    if truth is None and calibration_rows is not None:
        held_out, fine = teacher_checks.check_on_rows(
            teacher_set,
            calibration_rows,
            np.flatnonzero(calibration_rows.labels() >= 0).tolist(),
            cfg.batch_size,
            device,
            "--calibration-data rows",
            compare=False,  # disagreement: on DATA's rows below, where ``fine`` are not flagged
        )
    flags = teacher_checks.check_teachers(
        teacher_set, None, known, labels, "rows of DATA", votes=survey.votes, fine=fine
    )
    return teacher_checks.record(teacher_set, flags + held_out)


def true_labels(cfg: LabelConfig, source: DataSource, classes: list[str]) -> np.ndarray | None:
    """True labels ``[N]`` (-1 unknown) from ``--eval-labels`` or DATA, or None if none."""
    if cfg.eval_labels:
        labels = eval_labels.true_labels(cfg.eval_labels, source, classes)
    else:
        labels = source.labels()
    return labels if (labels >= 0).any() else None


def run_record(
    cfg: LabelConfig, source: DataSource, classes: list[str], teacher_set: TeacherSet
) -> dict[str, Any]:
    """The run's identity: what the shards depend on, so what a resumed run must match
    (written to run.json). The generator and the output options may change on resume."""
    return {
        "teachers": [
            {"spec": spec, "name": name, "fingerprint": fp}
            for spec, name, fp in zip(
                teacher_set.specs, teacher_set.names, teacher_set.fingerprints()
            )
        ],
        "data": {
            "spec": cfg.data,
            "fingerprint": source.fingerprint,
            "rows": len(source),
            "split": source.split,
        },
        "classes": classes,
        "combiner": str(cfg.combiner),
        "calibration": cfg.calibration,
        "temperatures": teacher_set.temperatures,
        "shard_size": cfg.shard_size,
        "skip_bad_rows": cfg.skip_bad_rows,
    }


def fill_fingerprints(record: dict[str, Any], teacher_set: TeacherSet, wait: bool) -> bool:
    """Put into ``record`` the teachers' fingerprints that read ``PENDING`` when it was made
    (files still being hashed in the background), once all are made (``wait``: waiting for
    them); whether it changed."""
    if all(entry["fingerprint"] != PENDING for entry in record["teachers"]):
        return False
    with deferred_hashes(enabled=not wait):
        found = teacher_set.fingerprints()
    if PENDING in found:
        return False
    for entry, fingerprint in zip(record["teachers"], found):
        entry["fingerprint"] = fingerprint
    return True


def refuse_unfingerprinted(out: Path) -> None:
    """Refuse to resume a run stopped before its teacher files' hashes were recorded (its
    first seconds): its shards cannot be checked against the files."""
    marker = out / MARKER
    try:
        teachers = json.loads(marker.read_text())["config"]["teachers"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no such run, or not one of ours: prepare_out_dir says so
    if any(entry.get("fingerprint") == PENDING for entry in teachers):
        raise UsageError(
            f"{out} holds a run stopped before its teacher files were hashed (its first "
            "seconds), so its shards cannot be checked against them; label again with "
            "--overwrite"
        )


def output_settings(cfg: LabelConfig) -> dict[str, Any]:
    """What is decided after the shards: the generator and the output options."""
    return {
        "generator": cfg.generator,
        "with_inputs": cfg.with_inputs,
        "eval_labels": cfg.eval_labels,
        "probs": cfg.probs,
    }


def finished_report(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The report of the finished run in ``out``, resumed with the same output settings."""
    report = json.loads((out / "report.json").read_text())
    spec_of = ("generator", "probs")
    done = {key: report[key]["spec"] if key in spec_of else report[key] for key in settings}
    changed = [
        f"{key} {done[key]!r} (now {settings[key]!r})"
        for key in settings
        if done[key] != settings[key]
    ]
    if changed:
        raise UsageError(
            f"{out} is a finished run made with {', '.join(changed)}; its shards are gone, "
            "so label again with --overwrite"
        )
    return report


def label_shards(
    source: DataSource,
    teacher_set: TeacherSet,
    combiner: Any,
    shards: list[Shard],
    batch_size: int,
    device: torch.device,
    progress: bool,
    keep_probs: bool,
    after_shard: Callable[[], None] = lambda: None,
) -> None:
    """Run the teachers and the combiner over ``shards``, writing each when it is done
    (with the teachers' probabilities where ``keep_probs``) in a thread, while the next
    shard computes; ``after_shard()`` is called after each.

    Batches never cross a shard's edge, so a row is computed in the same batch whether
    its shard runs in the first attempt or after a resume (identical floats)."""
    from kdplug.progress import Progress

    counts = [batch_count(len(shard.rows), batch_size, False) for shard in shards]
    if teacher_set.reads_inputs:
        loader = batches(
            source,
            batch_size,
            groups=[list(shard.rows) for shard in shards],
            workers=loader_workers(source),
            pin_memory=device.type == "cuda",
        )
        stream = iter(loader)  # one loader (and one set of workers) for every shard
    else:  # precomputed teachers only: DATA's rows are never read
        stream = index_batches(source, [shard.rows for shard in shards], batch_size, device)
    all_known = bool(teacher_set.known.all())  # once: votes need no mask
    metadata = {PROBS_KEY: str(keep_probs)}
    bar = Progress("label", sum(counts), show=progress)
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        writing = None  # the previous shard's write, done while this one computes
        for shard, count in zip(shards, counts):
            rows = itertools.islice(stream, count)
            tensors = label_rows(
                rows, len(shard.rows), teacher_set, combiner, device, bar, keep_probs, all_known
            )
            if writing is not None:
                writing.result()  # at most one shard waits in memory; its error surfaces here
            writing = writer.submit(write_shard, shard, tensors, metadata)
            after_shard()
        if writing is not None:
            writing.result()


def loader_workers(source: DataSource) -> int:
    """Workers to read DATA: for images (decoding), not for feature rows, which Arrow slices
    faster in this process than workers could hand them over."""
    return default_workers(len(source)) if source.kind == "image" else 0


@torch.inference_mode()
def label_rows(
    rows: Any,
    count: int,
    teacher_set: TeacherSet,
    combiner: Any,
    device: torch.device,
    bar: Any,
    keep_probs: bool = False,
    all_known: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of the batches ``rows`` (``(x, y, idx)``, ``count`` rows in all):
    ``target [R, C]`` (the combined prediction), ``votes`` and ``weights [K, R]``, ``bad
    [R]`` (a teacher gave NaN/Inf) and, with ``keep_probs``, ``teacher_probs [K, R, C]``.

    Each batch's results are copied straight into the shard's host tensors (``ShardBuffers``:
    no list of batches, no concatenation; pinned and without blocking on CUDA); the host
    waits for the device once, at the shard's end, then checks them."""
    K, C = len(teacher_set.teachers), len(teacher_set.classes)
    out_rows = ShardBuffers(count, K, C, keep_probs, device)
    for x, _, idx in rows:
        x = x.to(device, non_blocking=True)
        with autocast(device):
            out = teacher_set(x, idx)  # row positions stay on the host, where files are read
        logits = out.logits.float()
        unlabeled = torch.full((x.shape[0],), -1, dtype=torch.long, device=device)
        batch = f" on batch {teacher_set.batches_seen - 1}"
        with running(combiner, "the combiner", batch):
            weights, target = combined_prediction(combiner, logits, out.known, unlabeled)
        # each teacher's vote, among the classes it knows (no mask needed where all do)
        votes = argmax(logits) if all_known else teacher_checks.teacher_votes(logits, out.known)
        found = {
            "target": target.float(),
            "votes": votes.int(),
            "weights": weights.float(),
            "bad": out.bad_rows,
        }
        if keep_probs:
            found["teacher_probs"] = teacher_probs(logits, out.known)
        out_rows.add(found, idx)
        bar.update(1, rows=len(idx))
    merged, data_rows = out_rows.finish()
    refuse_invalid(
        combiner, "the combiner", "weights", merged["weights"].T, data_rows, finite_only=True
    )
    refuse_invalid(combiner, "the combiner", "probabilities", merged["target"], data_rows)
    return merged


class ShardBuffers:
    """A shard's results on the host, filled batch by batch: rows along dim 0 of ``target``
    and ``bad``, dim 1 of ``votes``, ``weights`` and ``teacher_probs``."""

    ROW_DIM = {"target": 0, "bad": 0, "votes": 1, "weights": 1, "teacher_probs": 1}

    def __init__(self, rows: int, K: int, C: int, keep_probs: bool, device: torch.device):
        pin = device.type == "cuda"
        shapes = {
            "target": ((rows, C), torch.float32),
            "votes": ((K, rows), torch.int32),
            "weights": ((K, rows), torch.float32),
            "bad": ((rows,), torch.bool),
        }
        if keep_probs:
            shapes["teacher_probs"] = ((K, rows, C), torch.float32)
        self.tensors = {
            key: torch.empty(shape, dtype=dtype, pin_memory=pin)
            for key, (shape, dtype) in shapes.items()
        }
        self.tensors["bad"].zero_()
        self.index = torch.empty(rows, dtype=torch.long)
        self.filled, self.device = 0, device

    def add(self, found: dict[str, torch.Tensor | None], idx: torch.Tensor) -> None:
        """Copy one batch's results (``bad`` None: no bad row) after the rows so far."""
        start, stop = self.filled, self.filled + len(idx)
        for key, value in found.items():
            if value is not None:
                part = self.tensors[key].narrow(self.ROW_DIM[key], start, stop - start)
                part.copy_(value, non_blocking=True)
        self.index[start:stop] = idx
        self.filled = stop

    def finish(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The filled tensors and the rows' data positions, once the device is done."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the shard's one wait
        if self.filled != len(self.index):
            raise RuntimeError(f"a shard of {len(self.index)} rows got {self.filled}")
        return self.tensors, self.index


@dataclass
class Survey:
    """What one pass over the finished shards gathers before the generator: which rows are
    good (``good [N]``), the teachers' votes on them (``votes [K, G]``) and the combined
    prediction and the votes of the rows a generator is fitted on (``fit_target [M, C]``,
    ``fit_votes [K, M]``, their mask among those rows ``fit_good [M]``)."""

    good: torch.Tensor
    votes: torch.Tensor
    fit_target: torch.Tensor | None
    fit_votes: torch.Tensor | None
    fit_good: torch.Tensor | None


class ShardReader:
    """The finished shards of a run, read one at a time (``known [K, C]``; ``keep_probs``:
    the generator reads the teachers' probabilities, which every shard must then hold)."""

    def __init__(self, shards: list[Shard], known: torch.Tensor, keep_probs: bool):
        self.shards, self.known, self.keep_probs = shards, known, keep_probs

    def read(self, shard: Shard) -> dict[str, torch.Tensor]:
        keys = ["target", "votes", "weights", "bad"]
        if self.keep_probs:
            if read_shard_metadata(shard).get(PROBS_KEY) != "True":
                raise UsageError(
                    f"{shard.path.parent.parent}: its shards were written for a generator that "
                    "does not read the teachers' probabilities, and this one does; label again "
                    "with --overwrite (or resume with the first run's generator)"
                )
            keys.append("teacher_probs")
        return read_shard(shard, keys)

    def rows(self, shard: Shard, tensors: dict[str, torch.Tensor] | None = None) -> ShardRows:
        """The shard's good rows as a generator sees them."""
        tensors = self.read(shard) if tensors is None else tensors
        index, target = torch.arange(shard.start, shard.stop), tensors["target"]
        votes, probs = tensors["votes"].long(), tensors.get("teacher_probs")  # votes: int32
        if not tensors["bad"].any():  # the shard's own tensors, no copy
            return ShardRows(index, target, votes, self.known, probs)
        good = ~tensors["bad"]
        return ShardRows(
            index[good],
            target[good],
            votes[:, good],
            self.known,
            None if probs is None else probs[:, good],
        )

    def label_shards(self, survey: Survey) -> LabelShards:
        """What a generator's ``prepare`` iterates (the good-row count from ``survey``)."""
        loaders = [functools.partial(self.rows, shard) for shard in self.shards]
        return LabelShards(loaders, int(survey.good.sum()), self.known)

    def survey(self, fit_rows: np.ndarray | None) -> Survey:
        """One pass: the good rows, their votes, and the target and the votes of the rows
        ``fit_rows`` (positions in DATA; None: none gathered)."""
        good, votes, targets, fit_votes, goods = [], [], [], [], []
        wanted = None if fit_rows is None else torch.from_numpy(fit_rows)
        for shard in self.shards:
            tensors = read_shard(
                shard, ["votes", "bad", *(["target"] if wanted is not None else [])]
            )
            ok = ~tensors["bad"]
            good.append(ok)
            votes.append(tensors["votes"][:, ok])
            if wanted is not None:
                mine = wanted[(wanted >= shard.start) & (wanted < shard.stop)] - shard.start
                targets.append(tensors["target"][mine])
                fit_votes.append(tensors["votes"][:, mine])
                goods.append(ok[mine])
        good = torch.cat(good)
        if not good.any():
            raise UsageError("every row had NaN or Inf teacher outputs; nothing to label")
        return Survey(
            good,
            torch.cat(votes, dim=1),
            torch.cat(targets) if wanted is not None else None,
            torch.cat(fit_votes, dim=1) if wanted is not None else None,
            torch.cat(goods) if wanted is not None else None,
        )


@dataclass
class PickRows:
    """The labeled rows a generator with ``fit`` is fitted on: ``--calibration-data``'s
    (``source``: the teachers run on them) or DATA's own (``source`` None: the shards
    hold their combined prediction). ``rows`` their positions, ``labels`` their labels."""

    name: str
    source: DataSource | None
    rows: np.ndarray
    labels: np.ndarray


def generator_fit_rows(
    generator: Any, spec: str, source: DataSource, calibration: DataSource | None
) -> PickRows | None:
    """Where a generator with ``fit`` (``threshold,accuracy=A``) is fitted: the labeled
    ``--calibration-data`` rows, else DATA's own labeled rows (never ``--eval-labels``,
    which stay a measurement); None for a generator without ``fit``. Refused, before any
    teacher runs, where the run has neither."""
    if not can_fit(generator):
        return None
    if calibration is not None:
        rows = np.flatnonzero(calibration.labels() >= 0)
        return PickRows("--calibration-data", calibration, rows, calibration.labels()[rows])
    labels = source.labels()
    rows = np.flatnonzero(labels >= 0)
    if not len(rows):
        raise UsageError(
            f"label generator {spec!r} is fitted on labeled rows, and this run has none: "
            "give --calibration-data DATA2 (labeled rows the teachers were not trained on), "
            "or DATA with labels (--eval-labels are only measured against)"
        )
    return PickRows("DATA", None, rows, labels[rows])


def fit_generator(
    generator: Any,
    spec: str,
    pick: PickRows | None,
    survey: Survey,
    combiner: Any,
    fitted: dict[str, Any],
    teacher_set: TeacherSet,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any] | None:
    """Call the generator's ``fit`` with the combined prediction of the rows ``pick`` and
    their labels; its record, with where the rows came from, for report.json (None without
    ``fit``). On ``--calibration-data`` rows a combiner fitted there predicts each row out
    of fold (``kdplug.fitting.held_out_prediction``), as it predicts DATA's rows."""
    from kdplug.fitting import (
        HINT,
        check_fit_rows,
        collect_outputs,
        fit_rows_record,
        held_out_prediction,
        seen_rows,
    )

    if pick is None:
        return None
    if pick.source is None:
        good = survey.fit_good
        prediction = survey.fit_target[good]
        labels = torch.from_numpy(pick.labels)[good]
        log.warning(
            "label generator %r is fitted on DATA's %d labeled rows, so the report's accuracy "
            "on them is not a held-out measure; give --calibration-data for one",
            spec,
            len(labels),
        )
        seen = None
        if len(labels):
            accuracy = (survey.fit_votes[:, good] == labels).double().mean(1).tolist()
            seen = fit_rows_record(accuracy, len(labels), "labeled rows of DATA")
    else:
        out = collect_outputs(teacher_set, pick.source, pick.rows.tolist(), batch_size, device)
        logits, known, labels = out
        seen = check_fit_rows(logits, known, labels, "--calibration-data rows")
        record = fitted.get("combiner")
        if isinstance(record, dict) and record.get("fitted") is not False:
            prediction = held_out_prediction(combiner, logits, known, labels)
        else:
            unlabeled = torch.full_like(labels, -1)
            prediction = combined_prediction(combiner, logits, known, unlabeled)[1]
    with running(generator, f"label generator {spec!r}", " while fitting on the labeled rows"):
        record = generator.fit(prediction.float().cpu(), labels.cpu())
    record = {"on": pick.name, **(record or {}), "fit_rows": seen}
    if seen and seen["near_perfect"]:
        log.warning(
            "label generator %r is fitted where %s: what it picks there (a threshold for an "
            "accuracy) is too lenient on rows the teachers did not see; %s",
            spec,
            seen_rows(seen),
            HINT,
        )
    log.info(
        "label generator %r fitted on %d labeled rows of %s: %s",
        spec,
        len(labels),
        pick.name,
        ", ".join(f"{k}={rounded(v)}" for k, v in record.items() if k not in ("on", "fit_rows")),
    )
    return record


def rounded(value: Any) -> Any:
    """``value`` with its floats (also in a list) to 4 significant digits, for a log line."""
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return float(f"{value:.4g}") if isinstance(value, float) else value


def write_dataset(
    directory: Path,
    reader: ShardReader,
    generator: Any,
    name: str,
    source: DataSource,
    with_inputs: bool,
    classes: list[str],
    probs: tuple[str, int | None],
    truth: np.ndarray | None,
) -> LabelTally:
    """Decide every shard with ``generator`` (``name`` names it) and write its rows into
    the dataset at ``directory`` (DATA's inputs first, ``with_inputs``; the rows' ``file``
    and ``id`` where DATA has them: ``kdplug.row_keys``) and the report's tally, one shard
    at a time: the generator decides the shards in order here, while ``COLUMN_THREADS``
    threads make the decided shards' columns (the per-row figures, the top k, the Arrow
    table), which are written and tallied in order. At most ``COLUMN_THREADS`` decided
    shards are in memory."""
    import pyarrow as pa

    mode, k = probs
    private = is_private(generator)
    keys = key_names(source)
    ours = label_features(classes, mode, k, private, keys)
    feats, renamed = with_input_features(ours, source if with_inputs else None)
    writer = DatasetWriter(directory, feats, len(reader.shards))
    ours_schema = ours.arrow_schema  # once: slow to make with a ClassLabel of many names
    tally = LabelTally(len(reader.known), len(classes), reader.known.numpy())

    def columns_of(shard: Shard, tensors: dict, rows: ShardRows, decided: Any) -> tuple:
        label, accepted, soft = spread(generator, name, decided, rows, tensors["bad"])
        columns = shard_columns(shard.start, label, accepted, soft, tensors["votes"], private)
        # the target's class: the probs' where the generator kept the target as its probs
        kept = decided.probs is rows.target
        target_class = columns["predicted"] if kept else argmax(tensors["target"]).numpy()
        columns.update(key_columns(source, shard.start, shard.stop, keys))
        return columns, target_class, arrow_table(columns, ours_schema, mode, k)

    def write(shard: Shard, tensors: dict, made: Future) -> None:
        columns, target_class, table = made.result()
        if with_inputs:
            inputs = input_table(source, shard, renamed)
            table = pa.Table.from_arrays(inputs.columns + table.columns, schema=writer.schema)
        writer.write(table)
        tally.add(
            columns,
            tensors["votes"].numpy(),
            tensors["weights"].numpy(),
            tensors["bad"].numpy(),
            target_class,
            None if truth is None else truth[shard.start : shard.stop],
        )

    waiting: collections.deque = collections.deque()
    with ThreadPoolExecutor(COLUMN_THREADS, thread_name_prefix="label-columns") as pool:
        for shard in reader.shards:
            tensors = reader.read(shard)
            rows = reader.rows(shard, tensors)
            with running(generator, name, f" on rows {shard.start}..{shard.stop - 1}"):
                decided = generator.decide(rows)
            waiting.append((shard, tensors, pool.submit(columns_of, shard, tensors, rows, decided)))
            if len(waiting) >= COLUMN_THREADS:
                write(*waiting.popleft())
        while waiting:
            write(*waiting.popleft())
    writer.close()
    return tally


def spread(
    generator: Any, name: str, decided: Any, rows: ShardRows, bad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check a generator's decision on a shard's good ``rows`` and spread it over all the
    shard's rows (bad rows: label -1, not accepted, uniform probs)."""
    C = rows.target.shape[1]
    what = component_name(generator, name)
    problem = shape_problem(decided, len(rows), C)
    if problem:
        raise PluginError(f"{what} {problem}")
    if decided.probs is not rows.target:  # the target was checked when its shard was made
        refuse_invalid(generator, what, "probabilities", decided.probs.float(), rows.index)
    outside = decided.accepted.bool() & ((decided.label < 0) | (decided.label >= C))
    if outside.any():
        raise PluginError(
            f"{what} accepted rows {rows.index[outside][:5].tolist()} with labels "
            f"{decided.label[outside][:5].tolist()}, outside the {C} classes 0..{C - 1}"
        )
    accepted, probs = decided.accepted.bool(), decided.probs.float()
    hard = torch.where(accepted, decided.label.long(), -1)
    if not bad.any():
        return hard, accepted, probs
    good = ~bad
    label = torch.full((len(bad),), -1, dtype=torch.long)
    label[good] = hard
    soft = torch.full((len(bad), C), 1.0 / C, dtype=torch.float32)
    soft[good] = probs
    return label, good.clone().masked_scatter_(good, accepted), soft


def with_input_features(ours: Any, source: DataSource | None) -> tuple[Any, dict[str, str]]:
    """The dataset's features: DATA's input columns first (renamed ``input_NAME`` where a
    name is one of ours) when ``source`` is given, then ours; and the renaming."""
    import datasets

    if source is None:
        return ours, {}
    inputs = {c: source.dataset.features[c] for c in source.input_columns}
    renamed = {c: f"input_{c}" if c in ours else c for c in inputs}
    merged = {renamed[c]: feature for c, feature in inputs.items()}
    return datasets.Features({**merged, **ours}), renamed


def input_table(source: DataSource, shard: Shard, renamed: dict[str, str]) -> Any:
    """DATA's input columns for the shard's rows, renamed, as a ``pyarrow.Table``."""
    table = source.dataset.select_columns(list(renamed)).with_format("arrow")[
        shard.start : shard.stop
    ]
    return table.rename_columns([renamed[c] for c in table.column_names])


def refuse_invalid(
    component: Any,
    what: str,
    name: str,
    values: torch.Tensor,
    rows: torch.Tensor,
    finite_only: bool = False,
) -> None:
    """Refuse a plugin's output ``values [R, ...]`` for the data rows ``rows [R]`` that
    holds NaN or Inf (or, unless ``finite_only``, a value below 0): a PluginError naming the
    component (``what`` where no registry built it) and the first such rows."""
    if finite_only:
        bad = ~torch.isfinite(values.detach().reshape(len(values), -1)).all(1)
    else:
        bad = invalid_rows(values)
    if bad.any():
        kind = "NaN or Inf" if finite_only else "NaN, Inf or negative"
        first, count = rows.to(bad.device)[bad][:5].tolist(), int(bad.sum())
        raise PluginError(
            f"{component_name(component, what)} returned {kind} {name} for {count} "
            f"row{'s' * (count != 1)}, e.g. rows {first}"
        )


def is_private(generator: Any) -> bool:
    """A generator with ``private = True`` (pate) releases only its labels and probs."""
    return bool(getattr(generator, "private", False))


def generator_options(spec: str) -> dict[str, Any]:
    """The generator's options as run: its factory's defaults updated by the spec."""
    parsed = parse_spec(spec)
    component = get_manager().registries["label-generators"].get(parsed.name)
    accepted = component.options() or {}
    defaults = {name: p.default for name, p in accepted.items() if p.default is not p.empty}
    return {**defaults, **typed_options(component.factory, parsed.raw or {}, parsed.name)}
