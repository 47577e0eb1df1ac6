"""Teachers on a labeled split: calibration (``teachers calibrate``) and diagnostics (``report``).

``calibrate`` collects every teacher's logits ``[K, N, C]`` on the labeled rows and fits
one temperature per teacher. ``report`` runs the teachers over the labeled rows once and
sums what it says batch by batch (``kdplug.reports.teachers``): per-teacher accuracy, NLL,
ECE (before and after temperature scaling), accuracy per class, the pairwise agreement
matrix and the combiners without a fit; only the outputs of at most ``FIT_ROWS`` rows are
kept, for the teacher checks, the held-out combiners (``auto``) and the teacher selection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug import metrics, ops, teacher_checks
from kdplug.calibration import T_MIN, apply_temperature, fit_temperature, load_temperatures
from kdplug.data import DataSource, batches, load_data
from kdplug.errors import KdplugError, UsageError
from kdplug.fitting import check_fit_rows, seen_rows
from kdplug.outputs import check_out, versions, write_json
from kdplug.reports.teachers import (
    Scores,
    Tally,
    reliability_figure,  # noqa: F401 (imported from here too)
    write_report,
)
from kdplug.teachers import TeacherSet, create_teachers

log = logging.getLogger("kdplug")


@dataclass
class Collected:
    """Every teacher's raw (uncalibrated) aligned logits on the labeled rows."""

    logits: torch.Tensor  # [K, N, C] float32
    known: torch.Tensor  # [K, C] bool
    labels: torch.Tensor  # [N] int64
    skipped: int  # rows dropped because a teacher returned NaN/Inf (--skip-bad-rows)


def labeled_source(data: str) -> tuple[DataSource, np.ndarray]:
    """The DATA spec as a source with class names and at least one labeled row, and the
    positions of its labeled rows."""
    source = load_data(data)
    if source.label_column is None or not source.classes:
        raise UsageError(
            f"{data}: needs a label column with class names to judge teachers "
            f"(columns: {source.columns})"
        )
    labeled = np.flatnonzero(source.labels() >= 0)
    if not len(labeled):
        raise UsageError(f"{data}: no row has a label")
    return source, labeled


def collect(
    teacher_set: TeacherSet,
    source: DataSource,
    labeled: np.ndarray,
    batch_size: int,
    device: torch.device,
    desc: str,
) -> Collected:
    """Run the teachers over the rows ``labeled`` of ``source`` with a progress bar."""
    from kdplug.progress import track

    teacher_set.check_data(source)
    teacher_set.to(device)
    logits, labels, skipped = [], [], 0
    pin = device.type == "cuda"
    loader = batches(source, batch_size, indices=labeled, pin_memory=pin)
    for x, y, idx in track(loader, desc):
        out = teacher_set(x.to(device), idx)
        keep = torch.ones(len(y), dtype=torch.bool)
        if out.bad_rows is not None:
            keep = ~out.bad_rows.cpu()
            skipped += int(out.bad_rows.sum())
        logits.append(out.logits.cpu()[:, keep])
        labels.append(y[keep])
    return Collected(torch.cat(logits, 1), teacher_set.known.cpu(), torch.cat(labels), skipped)


def scores(logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, NLL and ECE of one teacher's logits ``[N, C]`` (renormalized over ``known``)."""
    probs = ops.teacher_probs(logits, known)
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "nll": metrics.nll(probs, labels),
        "ece": metrics.ece(probs, labels),
    }


def calibrate(
    specs: Sequence[str],
    data: str,
    out: str,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    skip_bad_rows: bool = False,
) -> dict[str, Any]:
    """Fit one temperature per teacher on ``data`` and write them to ``out`` (JSON, atomic)."""
    check_out(out, inputs=[*specs, data], directory=False)
    teachers = create_teachers(specs)  # bad teacher files fail before the data is read
    source, labeled = labeled_source(data)
    teacher_set = TeacherSet(
        teachers, specs, source.classes, skip_bad_rows=skip_bad_rows, data=source
    )
    found = collect(teacher_set, source, labeled, batch_size, torch.device(device), "calibrate")
    flags = teacher_checks.check_teachers(
        teacher_set, found.logits, found.known, found.labels, f"rows of {data}"
    )
    seen = check_fit_rows(found.logits, found.known, found.labels, f"rows of {data}")
    if seen and seen["near_perfect"]:
        log.warning(
            "%s: temperatures fitted there come out too sharp for rows the teachers did not "
            "see (a teacher right on every row gets the lowest, %s); calibrate on labeled "
            "rows they were not trained on",
            seen_rows(seen),
            T_MIN,
        )
    entries = []
    for k, (spec, fingerprint) in enumerate(zip(specs, teacher_set.fingerprints())):
        logits, known = found.logits[k], found.known[k]
        temperature = fit_temperature(logits, found.labels, known)
        before = scores(logits, known, found.labels)
        after = scores(apply_temperature(logits, temperature), known, found.labels)
        entries.append(
            {
                "name": teacher_set.names[k],
                "spec": spec,
                "fingerprint": fingerprint,
                "temperature": temperature,
                "nll_before": before["nll"],
                "nll_after": after["nll"],
                "ece_before": before["ece"],
                "ece_after": after["ece"],
                "accuracy": before["accuracy"],
            }
        )
    record = {
        "teachers": entries,
        "data": data,
        "data_fingerprint": source.fingerprint,
        "data_split": source.split,
        "rows": len(found.labels),
        "skipped_rows": found.skipped,
        "fit_rows": seen,
        "teacher_checks": teacher_checks.record(teacher_set, flags),
        "versions": versions(),
    }
    write_json(out, record)
    return record


class EnsembleScores:
    """Accuracy, NLL and ECE of the ensemble under every registered combiner.

    Each combiner is built with its default options and sees no labels (-1), as on
    unlabeled data. One without a ``fit`` step is scored on every labeled row, batch by
    batch (``add``); one with a fit (``auto``) is scored out of fold on the rows kept for
    fitting (``finish``), each row by a copy fitted on the other folds
    (``kdplug.fitting.held_out_prediction``). One that cannot be built or run that way is
    listed with the reason.
    """

    def __init__(self, known: torch.Tensor, chunk: int) -> None:
        from kdplug.fitting import can_fit
        from kdplug.plugins import get_manager

        self.known, self.chunk = known, chunk
        self.combiners: list[tuple[Any, Any, Any]] = []  # (component, combiner, Scores | None)
        self.skipped: list[dict[str, str]] = []
        self.held_out: dict[str, torch.Tensor] = {}  # name -> prediction [N, C] (finish)
        registry = get_manager().registries["combiners"]
        for component in registry:
            try:
                combiner = registry.create(component.name)
            except Exception as exc:
                self.skipped.append({"name": component.name, "reason": reason(exc)})
                continue
            self.combiners.append((component, combiner, None if can_fit(combiner) else Scores()))

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Score the combiners without a fit on one batch: ``logits [K, B, C]``."""
        from kdplug.fitting import combined_prediction

        unlabeled = torch.full_like(labels, -1)
        for entry in list(self.combiners):
            component, combiner, scores = entry
            if scores is None:
                continue
            try:
                _, probs = combined_prediction(combiner, logits, self.known, unlabeled)
                scores.add(probs.float(), labels)
            except Exception as exc:
                self.drop(entry, exc)

    def finish(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
        """Score the combiners with a fit on the fit rows (``logits [K, N, C]``, ``labels
        [N]``); returns ``(results, skipped)`` in the registry's order."""
        from kdplug.fitting import FOLDS, held_out_prediction

        results = []
        for entry in list(self.combiners):
            component, combiner, scores = entry
            held_out = scores is None
            if held_out:
                log.info(
                    "scoring combiner %r held out: %d fits on %d rows x %d classes",
                    component.name,
                    min(FOLDS, len(labels)),
                    len(labels),
                    logits.shape[2],
                )
                try:
                    probs = held_out_prediction(
                        combiner, logits, self.known, labels, chunk=self.chunk
                    )
                except Exception as exc:
                    self.drop(entry, exc)
                    continue
                self.held_out[component.name] = probs
                scores = Scores()
                scores.add(probs.float(), labels)
            figures = scores.result()
            results.append(
                {
                    "name": component.name,
                    "plugin": component.plugin,
                    "held_out": held_out,
                    "rows": scores.rows,
                    **{key: figures[key] for key in ("accuracy", "nll", "ece")},
                }
            )
        return results, self.skipped

    def drop(self, entry: tuple[Any, Any, Any], exc: Exception) -> None:
        """A combiner that failed: note why, judge the others."""
        self.combiners.remove(entry)
        self.skipped.append({"name": entry[0].name, "reason": reason(exc)})


def reason(exc: Exception) -> str:
    """Why a combiner is left out: a KdplugError's message, or the bug's type and text."""
    return str(exc) if isinstance(exc, KdplugError) else f"failed: {type(exc).__name__}: {exc}"


def combiner_scores(
    logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor, chunk: int
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``EnsembleScores`` of the labeled rows of ``logits [K, N, C]`` held in memory."""
    rows = labels >= 0
    logits, labels = logits[:, rows], labels[rows]
    ensemble = EnsembleScores(known, chunk)
    for start in range(0, len(labels), chunk):
        ensemble.add(logits[:, start : start + chunk], labels[start : start + chunk])
    return ensemble.finish(logits, labels)


def report(
    specs: Sequence[str],
    data: str,
    out: str | None = None,
    calibration: str | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    skip_bad_rows: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Judge the teachers on ``data``; with ``out``, write report.json and PNG figures there.

    One pass of the teachers over the labeled rows: every figure of the teachers and of the
    combiners without a fit is summed batch by batch (``kdplug.reports.teachers.Tally``),
    and the outputs of at most ``FIT_ROWS`` of the rows (a fixed random choice) are kept for
    what needs them together: the teacher checks, the held-out combiners and the selection.
    """
    if out is not None:
        _check_out(Path(out), overwrite, [*specs, data, calibration])
    teachers = create_teachers(specs)  # bad teacher files fail before the data is read
    source, labeled = labeled_source(data)
    teacher_set = TeacherSet(
        teachers, specs, source.classes, skip_bad_rows=skip_bad_rows, data=source
    )
    temperatures = None
    if calibration:
        temperatures = load_temperatures(calibration, specs, teacher_set.fingerprints())
    device = torch.device(device)
    kept = fit_sample(labeled, len(source))
    tally, ensemble, fit_rows, skipped = judge(
        teacher_set, source, labeled, kept, temperatures, batch_size, device
    )
    labels = torch.cat(fit_rows["labels"])
    logits = torch.cat(fit_rows["logits"], 1)
    described = f"rows of {data}"
    if len(labels) < tally.raw[0].rows:
        described = f"labeled rows of {data} (a random {len(labels)} of {tally.raw[0].rows})"
    known = teacher_set.known.cpu()
    flags = teacher_checks.check_teachers(teacher_set, logits, known, labels, described)
    seen = check_fit_rows(logits, known, labels, described)
    if seen and seen["near_perfect"]:
        log.warning(
            "%s: the figures below are the teachers on rows they were trained on, not a "
            "held-out measure; report on labeled rows they did not see",
            seen_rows(seen),
        )
    entries = []
    for k, (spec, fingerprint) in enumerate(zip(specs, teacher_set.fingerprints())):
        figures = tally.teacher(k)
        entry = {
            "name": teacher_set.names[k],
            "spec": spec,
            "fingerprint": fingerprint,
            "known_classes": int(known[k].sum()),
            **{key: figures[key] for key in ("accuracy", "nll", "ece")},
            "accuracy_known_classes": figures["accuracy_known_classes"],
            "reliability": figures["reliability"],
            "class_accuracy": figures["class_accuracy"],
        }
        if temperatures is not None:
            entry["calibrated"] = {"temperature": temperatures[k], **tally.calibrated[k].result()}
        entries.append(entry)
    combiners, skipped_combiners = ensemble.finish(logits, labels)
    result = {
        "data": data,
        "data_fingerprint": source.fingerprint,
        "data_split": source.split,
        "classes": source.classes,
        "rows": tally.raw[0].rows,
        "skipped_rows": skipped,
        "fit_rows": len(labels),
        "training_rows_check": seen,
        "class_rows": tally.class_rows.cpu().tolist(),
        "calibration": calibration,
        "teachers": entries,
        "agreement": tally.agreement(),
        "combiners": combiners,
        "skipped_combiners": skipped_combiners,
        "selection": select_teachers(
            logits, known, labels, teacher_set, ensemble.held_out.get("auto")
        ),
        "teacher_checks": teacher_checks.record(teacher_set, flags),
        "versions": versions(),
    }
    if out is not None:
        write_report(Path(out), result)
    return result


def fit_sample(labeled: np.ndarray, rows: int) -> np.ndarray:
    """``[rows]`` bool: the labeled rows whose outputs are kept for the checks, the fits and
    the selection: all of them up to ``FIT_ROWS``, else a random ``FIT_ROWS`` (the same
    choice as ``kdplug.fitting.collect_outputs``)."""
    from kdplug.fitting import FIT_ROWS, fixed_sample

    kept = np.zeros(rows, dtype=bool)
    kept[labeled[fixed_sample(len(labeled), FIT_ROWS).numpy()]] = True
    return kept


@torch.no_grad()
def judge(
    teacher_set: TeacherSet,
    source: DataSource,
    labeled: np.ndarray,
    kept: np.ndarray,
    temperatures: list[float] | None,
    batch_size: int,
    device: torch.device,
) -> tuple[Tally, EnsembleScores, dict[str, list[torch.Tensor]], int]:
    """The one pass over the labeled rows: returns the ``Tally`` of every row, the
    combiners' running scores, the (calibrated) logits ``[K, B, C]`` and labels of the
    ``kept`` rows on the CPU, batch by batch, and the count of rows skipped (NaN/Inf)."""
    from kdplug.progress import track

    teacher_set.check_data(source)
    teacher_set.to(device)
    known = teacher_set.known.to(device)
    tally = Tally(known, calibrated=temperatures is not None)
    ensemble = EnsembleScores(known, batch_size)
    scale = None if temperatures is None else torch.tensor(temperatures, device=device)
    fit_rows: dict[str, list[torch.Tensor]] = {"logits": [], "labels": []}
    skipped = 0
    loader = batches(source, batch_size, indices=labeled, pin_memory=device.type == "cuda")
    for x, y, idx in track(loader, "report"):
        out = teacher_set(x.to(device), idx)
        logits, y = out.logits.float(), y.to(device)
        if out.bad_rows is not None:
            good = ~out.bad_rows.to(device)
            skipped += int((~good).sum())
            logits, y, idx = logits[:, good], y[good], idx[good.cpu()]
        scaled = None if scale is None else apply_temperature(logits, scale[:, None, None])
        tally.add(logits, scaled, y)
        combined = logits if scaled is None else scaled
        ensemble.add(combined, y)
        keep = torch.from_numpy(kept[idx.numpy()]).to(device)
        fit_rows["logits"].append(combined[:, keep].cpu())
        fit_rows["labels"].append(y[keep].cpu())
    return tally, ensemble, fit_rows, skipped


def select_teachers(
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    teacher_set: TeacherSet,
    held_out: torch.Tensor | None = None,
) -> dict[str, Any] | None:
    """Greedy backward elimination of teachers by the held-out NLL of the ``auto``
    ensemble (kdplug.selection), teachers by name, the recommended ones' specs too; None
    with one teacher or without ``auto`` installed. ``held_out``: ``auto``'s held-out
    prediction ``[N, C]`` with all the teachers, where the ensemble table made it."""
    from kdplug.fitting import FOLDS
    from kdplug.plugins import get_manager
    from kdplug.selection import backward_elimination, prediction_nll

    registry = get_manager().registries["combiners"]
    names = teacher_set.names
    if len(names) < 2 or "auto" not in registry:
        return None
    all_nll = None if held_out is None else prediction_nll(held_out, labels)
    log.info("teacher selection: backward elimination, %d fits of auto per subset tried", FOLDS)
    record = backward_elimination(
        lambda: registry.create("auto"), logits, known, labels, names, all_nll=all_nll
    )
    kept = record["recommended_indices"]
    return {"combiner": "auto", **record, "recommended_specs": [teacher_set.specs[k] for k in kept]}


def _check_out(out: Path, overwrite: bool, inputs: list[str | None]) -> None:
    check_out(out, inputs=inputs, overwrite=overwrite)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} is not empty; choose another --out or pass --overwrite")


def format_report(result: dict[str, Any]) -> str:
    """The report as plain-text tables: teachers, ensembles, agreement."""
    calibrated = result["calibration"] is not None
    classes = len(result.get("classes") or [])
    partial = any(t.get("known_classes", classes) < classes for t in result["teachers"])
    head = ["#", "teacher", "accuracy", "NLL", "ECE"]
    if partial:
        head.insert(3, "on its classes")
    if calibrated:
        head += ["T", "NLL after", "ECE after"]
    rows = [head]
    for k, t in enumerate(result["teachers"]):
        row = [str(k), t["name"], f"{t['accuracy']:.4f}", f"{t['nll']:.4f}"]
        row.append(f"{t['ece']:.4f}")
        if partial:
            own = t.get("accuracy_known_classes")
            figure = "-" if own is None else f"{own:.4f}"
            row.insert(3, f"{figure} ({t['known_classes']}/{classes})")
        if calibrated:
            c = t["calibrated"]
            row += [f"{c['temperature']:.3f}", f"{c['nll']:.4f}", f"{c['ece']:.4f}"]
        rows.append(row)
    lines = [
        f"{result['data']}: {result['rows']} labeled rows"
        + (f", {result['skipped_rows']} skipped (NaN/Inf)" if result["skipped_rows"] else ""),
        "",
        _table(rows),
        "",
    ]
    ensemble = [["combiner", "accuracy", "NLL", "ECE"], *combiner_rows(result["combiners"])]
    title = "ensemble (calibrated teachers)" if calibrated else "ensemble"
    if len(result["teachers"]) == 1:
        title += (
            ": one teacher, so every combiner gives it all the weight and only a calibrating "
            "one (auto) differs; combiners with the same figures share a row"
        )
    if result["combiners"]:
        lines += [title, _table(ensemble), ""]
    else:
        lines += ["ensemble: no combiner plugin is installed", ""]
    lines += [f"skipped combiner {s['name']}: {s['reason']}" for s in result["skipped_combiners"]]
    lines += format_selection(result.get("selection"))
    agreement = [["#"] + [str(k) for k in range(len(result["agreement"]))]]
    agreement += [[str(i)] + [f"{v:.2f}" for v in row] for i, row in enumerate(result["agreement"])]
    lines += ["", "agreement (fraction of rows with the same argmax)", _table(agreement)]
    return "\n".join(lines)


def combiner_rows(combiners: list[dict[str, Any]]) -> list[list[str]]:
    """The ensemble table's rows: combiners with the same figures (all of them but a
    calibrating one, with one teacher) share one row that names them all."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for c in combiners:
        figures = tuple(f"{c[key]:.4f}" for key in ("accuracy", "nll", "ece"))
        name = c["name"] + (" (held out)" if c.get("held_out") else "")
        groups.setdefault(figures, []).append(name)
    return [[", ".join(names), *figures] for figures, names in groups.items()]


def format_selection(selection: dict[str, Any] | None) -> list[str]:
    """The teacher-selection lines of the report (none without a selection)."""
    if not selection:
        return []
    lines = ["", "teacher selection (greedy backward elimination, held-out NLL of auto)"]
    for flagged in selection["flagged"]:
        lines.append(
            f"  flagged: {flagged['teacher']} (NLL without it {flagged['nll_without']:.4f})"
        )
    if not selection["flagged"]:
        lines.append("  no teacher's removal lowers the ensemble's NLL")
    lines.append(
        f"  recommended: {', '.join(selection['recommended'])} "
        f"(NLL {selection['nll_all']:.4f} -> {selection['nll_recommended']:.4f})"
    )
    return lines


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
