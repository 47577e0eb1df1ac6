"""Teachers on a labeled split: calibration (``teachers calibrate``) and diagnostics (``report``).

Both run the teachers once over the labeled rows (``collect``), then work on the collected
logits ``[K, N, C]``: per-teacher accuracy, NLL and ECE (before and after temperature
scaling), the pairwise agreement matrix, and each registered combiner's ensemble.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug import metrics, ops, teacher_checks
from kdplug.calibration import apply_temperature, fit_temperature, load_temperatures
from kdplug.data import DataSource, batches, load_data
from kdplug.errors import KdplugError, UsageError
from kdplug.outputs import atomic_path, check_out, versions, write_json
from kdplug.teachers import TeacherSet, create_teachers


@dataclass
class Collected:
    """Every teacher's raw (uncalibrated) aligned logits on the labeled rows."""

    logits: torch.Tensor  # [K, N, C] float32
    known: torch.Tensor  # [K, C] bool
    labels: torch.Tensor  # [N] int64
    skipped: int  # rows dropped because a teacher returned NaN/Inf (--skip-bad-rows)


def labeled_source(data: str) -> DataSource:
    """The DATA spec as a source with class names and at least one labeled row."""
    source = load_data(data)
    if source.label_column is None or not source.classes:
        raise UsageError(
            f"{data}: needs a label column with class names to judge teachers "
            f"(columns: {source.columns})"
        )
    if not (source.labels() >= 0).any():
        raise UsageError(f"{data}: no row has a label")
    return source


def collect(
    teacher_set: TeacherSet, source: DataSource, batch_size: int, device: torch.device, desc: str
) -> Collected:
    """Run the teachers over the labeled rows of ``source`` with a progress bar."""
    from tqdm import tqdm

    teacher_set.check_data(source)
    teacher_set.to(device)
    rows = np.flatnonzero(source.labels() >= 0).tolist()
    logits, labels, skipped = [], [], 0
    loader = batches(source, batch_size, indices=rows, pin_memory=device.type == "cuda")
    for x, y, idx in tqdm(loader, desc=desc, unit="batch", disable=None, file=sys.stderr):
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


def known_class_accuracy(
    logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor
) -> float | None:
    """Accuracy on the rows whose true class the teacher knows (``known [C]``): the figure
    of a teacher trained on some of the classes, judged on its own (None: no such row)."""
    rows = known[labels]
    if not rows.any():
        return None
    return metrics.accuracy(ops.teacher_probs(logits[rows], known), labels[rows])


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
    source = labeled_source(data)
    teacher_set = TeacherSet(
        teachers, specs, source.classes, skip_bad_rows=skip_bad_rows, data=source
    )
    found = collect(teacher_set, source, batch_size, torch.device(device), "calibrate")
    flags = teacher_checks.check_teachers(
        teacher_set, found.logits, found.known, found.labels, f"rows of {data}"
    )
    entries = []
    for k, (spec, fingerprint) in enumerate(zip(specs, teacher_set.fingerprints())):
        logits, known = found.logits[k], found.known[k]
        temperature = fit_temperature(logits, found.labels, known)
        before = scores(logits, known, found.labels)
        after = scores(apply_temperature(logits, temperature), known, found.labels)
        entries.append(
            {
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
        "teacher_checks": teacher_checks.record(teacher_set, flags),
        "versions": versions(),
    }
    write_json(out, record)
    return record


def combiner_scores(
    logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor, chunk: int
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Accuracy, NLL and ECE of the ensemble under every registered combiner.

    Each combiner is built with its default options and sees no labels (-1), as on
    unlabeled data; one with a ``fit`` step (``auto``) is scored out of fold, each row by a
    copy fitted on the other folds (``kdplug.fitting.held_out_prediction``). One that cannot
    be built or run that way is listed with the reason.
    """
    from kdplug.fitting import can_fit, held_out_prediction
    from kdplug.plugins import get_manager

    registry = get_manager().registries["combiners"]
    results, skipped = [], []
    for component in registry:
        try:
            combiner = registry.create(component.name)
            probs = held_out_prediction(combiner, logits, known, labels, chunk=chunk)
        except KdplugError as exc:
            skipped.append({"name": component.name, "reason": str(exc)})
            continue
        except Exception as exc:  # a combiner bug: note it, judge the others
            reason = f"failed: {type(exc).__name__}: {exc}"
            skipped.append({"name": component.name, "reason": reason})
            continue
        results.append(
            {
                "name": component.name,
                "plugin": component.plugin,
                "held_out": can_fit(combiner),
                "accuracy": metrics.accuracy(probs, labels),
                "nll": metrics.nll(probs, labels),
                "ece": metrics.ece(probs, labels),
            }
        )
    return results, skipped


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
    """Judge the teachers on ``data``; with ``out``, write report.json and PNG figures there."""
    if out is not None:
        _check_out(Path(out), overwrite, [*specs, data, calibration])
    teachers = create_teachers(specs)  # bad teacher files fail before the data is read
    source = labeled_source(data)
    teacher_set = TeacherSet(
        teachers, specs, source.classes, skip_bad_rows=skip_bad_rows, data=source
    )
    temperatures = None
    if calibration:
        temperatures = load_temperatures(calibration, specs, teacher_set.fingerprints())
    found = collect(teacher_set, source, batch_size, torch.device(device), "report")
    flags = teacher_checks.check_teachers(
        teacher_set, found.logits, found.known, found.labels, f"rows of {data}"
    )
    labels, entries, calibrated = found.labels, [], []
    for k, (spec, fingerprint) in enumerate(zip(specs, teacher_set.fingerprints())):
        logits, known = found.logits[k], found.known[k]
        entry = {
            "spec": spec,
            "fingerprint": fingerprint,
            "known_classes": int(known.sum()),
            **scores(logits, known, labels),
            "accuracy_known_classes": known_class_accuracy(logits, known, labels),
            "reliability": metrics.reliability(ops.teacher_probs(logits, known), labels),
        }
        if temperatures is not None:
            logits = apply_temperature(logits, temperatures[k])
            probs = ops.teacher_probs(logits, known)
            entry["calibrated"] = {
                "temperature": temperatures[k],
                **scores(logits, known, labels),
                "reliability": metrics.reliability(probs, labels),
            }
        calibrated.append(logits)
        entries.append(entry)
    ensemble = torch.stack(calibrated)
    predictions = ops.teacher_probs(ensemble, found.known).argmax(-1)
    combiners, skipped = combiner_scores(ensemble, found.known, labels, batch_size)
    selection = select_teachers(ensemble, found.known, labels, list(specs))
    result = {
        "data": data,
        "data_fingerprint": source.fingerprint,
        "data_split": source.split,
        "classes": source.classes,
        "rows": len(labels),
        "skipped_rows": found.skipped,
        "calibration": calibration,
        "teachers": entries,
        "agreement": metrics.agreement_matrix(predictions.numpy()).tolist(),
        "combiners": combiners,
        "skipped_combiners": skipped,
        "selection": selection,
        "teacher_checks": teacher_checks.record(teacher_set, flags),
        "versions": versions(),
    }
    if out is not None:
        _write(Path(out), result)
    return result


def select_teachers(
    logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor, specs: list[str]
) -> dict[str, Any] | None:
    """Greedy backward elimination of teachers by the held-out NLL of the ``auto``
    ensemble (kdplug.selection); None with one teacher or without ``auto`` installed."""
    from kdplug.plugins import get_manager
    from kdplug.selection import backward_elimination

    registry = get_manager().registries["combiners"]
    if len(specs) < 2 or "auto" not in registry:
        return None
    record = backward_elimination(lambda: registry.create("auto"), logits, known, labels, specs)
    return {"combiner": "auto", **record}


def _check_out(out: Path, overwrite: bool, inputs: list[str | None]) -> None:
    check_out(out, inputs=inputs, overwrite=overwrite)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} is not empty; choose another --out or pass --overwrite")


def _write(out: Path, result: dict[str, Any]) -> None:
    """report.json and the figures, put in place together (the whole directory is atomic)."""
    from kdplug.reports.figures import save_figure

    with atomic_path(out, directory=True) as tmp:
        for k, teacher in enumerate(result["teachers"]):
            save_figure(reliability_figure(teacher), tmp / f"reliability-{k}.png")
        names = [short(t["spec"]) for t in result["teachers"]]
        save_figure(agreement_figure(result["agreement"], names), tmp / "agreement.png")
        write_json(tmp / "report.json", result)


def short(spec: str, width: int = 32) -> str:
    """A spec cut to ``width`` characters for plots and tables (keeps its end)."""
    return spec if len(spec) <= width else "…" + spec[-(width - 1) :]


def reliability_figure(teacher: dict[str, Any]):
    """Accuracy against confidence per bin, each point labeled with its bin's row count; the
    calibrated curve too when there is one."""
    from kdplug.reports.figures import new_figure

    fig, ax = new_figure(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    curves = [("T=1", teacher)]
    if "calibrated" in teacher:
        curves.append((f"T={teacher['calibrated']['temperature']:.2f}", teacher["calibrated"]))
    for number, (label, entry) in enumerate(curves):
        table = entry["reliability"]
        used = [i for i, n in enumerate(table["count"]) if n]
        (line,) = ax.plot(
            [table["confidence"][i] for i in used],
            [table["accuracy"][i] for i in used],
            marker="o",
            label=f"{label} (ECE {entry['ece']:.3f}; n per bin)",
        )
        for i in used:  # below the point for the first curve, above it for the second
            ax.annotate(
                str(table["count"][i]),
                (table["confidence"][i], table["accuracy"][i]),
                xytext=(0, -10 if number == 0 else 6),
                textcoords="offset points",
                ha="center",
                fontsize=6,
                color=line.get_color(),
            )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(short(teacher["spec"], 48), fontsize=9)
    ax.legend(loc="best", fontsize=8)  # clear of the points and their counts
    return fig


def agreement_figure(matrix: list[list[float]], names: list[str]):
    """Heatmap of the fraction of rows on which two teachers predict the same class."""
    from kdplug.reports.figures import new_figure

    size = 2.5 + 0.6 * len(names)
    fig, ax = new_figure(figsize=(size, size))
    image = ax.imshow(np.asarray(matrix), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            color = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, label="agreement")
    ax.set_title("teacher agreement (same argmax)", fontsize=9)
    return fig


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
        row = [str(k), short(t["spec"]), f"{t['accuracy']:.4f}", f"{t['nll']:.4f}"]
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
            f"  flagged: {short(flagged['teacher'])} (NLL without it {flagged['nll_without']:.4f})"
        )
    if not selection["flagged"]:
        lines.append("  no teacher's removal lowers the ensemble's NLL")
    lines.append(
        f"  recommended: {', '.join(short(s) for s in selection['recommended'])} "
        f"(NLL {selection['nll_all']:.4f} -> {selection['nll_recommended']:.4f})"
    )
    return lines


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
