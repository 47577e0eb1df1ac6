"""Fitting components on labeled rows: the optional ``fit`` methods the engines call.

A combiner may define ``fit(logits [K, N, C], known [K, C], labels [N]) -> dict`` and a
loss strategy ``fit(logits, known, labels, combiner) -> dict`` (e.g. ``kd,T=auto``). An
engine collects the teachers' outputs on its labeled rows and calls ``fit_components``
once, before it combines any row; the returned dicts are JSON-ready and the engine writes
them into its metrics/report files. A combiner may also define ``predict(logits, known,
labels) -> (weights, probs)``, its prediction where that differs from its target at
temperature 1 (``auto``: calibrated teachers); ``combined_prediction`` calls it.
Held-out evaluation of a fitted combiner (``held_out_targets``, ``held_out_prediction``)
and the choice of the distillation temperature live here too.

A fit is meant for rows the teachers did not see. ``check_fit_rows`` reads teachers that
are near-perfect on the fit rows as teachers trained on them (``NEAR_PERFECT``); then no
combiner is fitted there (it is fitted on no rows: ``auto`` combines like ``mean``) and a
loss that fits (``T=auto``) is refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from kdplug import distributed, metrics, ops
from kdplug.errors import UsageError, origin, running

log = logging.getLogger("kdplug")

# the distillation temperatures T=auto chooses from: KD softens targets, never sharpens
TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
FOLDS = 5
# the fit rows look like the teachers' training rows when every teacher is at least this
# accurate on them, or when one teacher is right on every row (calibrating it there would
# sharpen it to the temperature clamp, kdplug.calibration.T_MIN: sharper only scores better)
NEAR_PERFECT = 0.99
# the most labeled rows whose outputs are collected for a fit or a check: [K, N, C] of them
# stay in memory (a float64 copy too, while fitting), so 20,000 rows of a 1,000-class problem
# with 3 teachers take about 0.7 GB, where ImageNet's 1.28M would take tens of GB
FIT_ROWS = 20_000
HINT = "give labeled rows the teachers did not see with --calibration-data"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the small fits here on one CPU thread: their tensors are far too small to gain
    from more, and on a busy machine the threads' synchronization makes them many times
    slower. The previous thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def split_folds(n: int, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """``folds`` disjoint sets of row positions covering ``range(n)`` (a seeded shuffle)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [part for part in torch.tensor_split(order, folds) if len(part)]


def fixed_sample(count: int, keep: int) -> torch.Tensor:
    """``keep`` of the positions ``range(count)``, sorted (all of them where ``count <=
    keep``): a random choice, the same on every run, as the fits and checks take their rows."""
    if count <= keep:
        return torch.arange(count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    return order[:keep].sort().values


def can_fit(component: Any) -> bool:
    return callable(getattr(component, "fit", None))


def combined_prediction(
    combiner: Any, logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [K, B], probs [B, C])``: the combiner's ``predict`` if it has one, else
    its target at temperature 1. What ``label`` writes and reports score."""
    predict = getattr(combiner, "predict", None)
    if callable(predict):
        return predict(logits, known, labels)
    return combiner(logits, known, labels, 1.0)


def invalid_rows(probs: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """``[R]`` bool: the rows of ``probs [R, ...]`` holding NaN, Inf or a value below 0
    (beyond float rounding): what no combiner or label generator may return."""
    flat = probs.detach().reshape(len(probs), -1)
    if not flat.shape[1]:
        return torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
    # NaN propagates through amin and amax: a row is finite and >= -tolerance exactly when
    # its min is >= -tolerance and its max is finite (two reductions, no [R, C] temporaries)
    low, high = flat.amin(1), flat.amax(1)
    return ~(low >= -tolerance) | ~torch.isfinite(high)


def held_out_targets(
    combiner: Any,
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    temperatures: Sequence[float] = (1.0,),
    folds: int = FOLDS,
    chunk: int = 4096,
) -> dict[float, torch.Tensor]:
    """The combiner's target ``[N, C]`` on the labeled rows at each temperature, every row
    from a combiner that did not see its label.

    A combiner with ``fit`` is copied and fitted on the other folds of each held-out fold
    (k-fold; with fewer than 2 labeled rows the given combiner is used as it is). Rows are
    combined with label -1, as unlabeled rows are. ``logits [K, N, C]``, ``labels [N]``.
    """
    outputs = {T: lambda c, x, k, y, T=T: c(x, k, y, T)[1] for T in temperatures}
    with one_thread():
        return _held_out(combiner, logits, known, labels, outputs, folds, chunk)


def held_out_prediction(
    combiner: Any,
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    folds: int = FOLDS,
    chunk: int = 4096,
) -> torch.Tensor:
    """``combined_prediction`` ``[N, C]`` on the labeled rows, held out as in
    ``held_out_targets``."""
    outputs = {"prediction": lambda c, x, k, y: combined_prediction(c, x, k, y)[1]}
    with one_thread():
        return _held_out(combiner, logits, known, labels, outputs, folds, chunk)["prediction"]


def _held_out(
    combiner: Any,
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    outputs: dict[Any, Callable[..., torch.Tensor]],
    folds: int,
    chunk: int,
) -> dict[Any, torch.Tensor]:
    rows = labels >= 0
    if not bool(rows.all()):
        logits, labels = logits[:, rows], labels[rows]
    N = len(labels)
    out = {key: logits.new_zeros(N, logits.shape[-1]) for key in outputs}
    parts = split_folds(N, min(folds, N)) if can_fit(combiner) and N >= 2 else []
    plan = [(held, fitted_copy(combiner, logits, known, labels, held)) for held in parts]
    plan = plan or [(torch.arange(N), combiner)]
    for held, fitted in plan:
        for start in range(0, len(held), chunk):
            index = held[start : start + chunk]
            unlabeled = torch.full((len(index),), -1, dtype=torch.long)
            for key, output in outputs.items():
                out[key][index] = output(fitted, logits[:, index], known, unlabeled).to(logits)
    return out


def fitted_copy(
    combiner: Any,
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    held: torch.Tensor,
) -> Any:
    """A copy of ``combiner`` fitted on every labeled row except those in ``held``."""
    train = torch.ones(len(labels), dtype=torch.bool)
    train[held] = False
    fitted = copy.deepcopy(combiner)
    fitted.fit(logits[:, train], known, labels[train])
    return fitted


def choose_temperature(
    combiner: Any,
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    candidates: Sequence[float] = TEMPERATURES,
    folds: int = FOLDS,
) -> dict[str, Any]:
    """The candidate T whose tempered combined target has the lowest held-out NLL on the
    labeled rows (``held_out_targets``); ties go to the smaller T."""
    targets = held_out_targets(combiner, logits, known, labels, candidates, folds)
    labels = labels[labels >= 0]
    nll = {T: metrics.nll(targets[T], labels) for T in candidates}
    best = min(candidates, key=lambda T: (nll[T], T))
    return {
        "T": float(best),
        "rows": len(labels),
        "held_out_nll": {f"{T:g}": round(value, 6) for T, value in nll.items()},
    }


def check_fit_rows(
    logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor, rows: str
) -> dict[str, Any] | None:
    """Each teacher's accuracy on the labeled rows (``logits [K, N, C]``, ``labels [N]``),
    and whether they look like the teachers' training rows (``fit_rows_record``). None with
    no labeled row. ``rows`` names the rows in messages."""
    usable = labels >= 0
    if not usable.any():
        return None
    probs = ops.teacher_probs(logits[:, usable].float(), known)
    accuracy = [metrics.accuracy(p, labels[usable]) for p in probs]
    return fit_rows_record(accuracy, int(usable.sum()), rows)


def fit_rows_record(accuracy: list[float], count: int, rows: str) -> dict[str, Any]:
    """Whether ``count`` labeled rows (named ``rows``) on which the teachers scored
    ``accuracy`` look like their training rows (``near_perfect``, with ``why``): every
    teacher at least ``NEAR_PERFECT`` accurate there, or one teacher right on every row
    (its temperature fitted there would fall to the clamp: sharper only scores better)."""
    perfect = [k for k, a in enumerate(accuracy) if a == 1.0]
    why = None
    if all(a >= NEAR_PERFECT for a in accuracy):
        why = f"every teacher is at least {NEAR_PERFECT} accurate there"
    elif perfect:
        why = f"teacher {perfect[0]} is right on every one of them"
    return {
        "rows": count,
        "source": rows,
        "teacher_accuracy": [round(a, 4) for a in accuracy],
        "near_perfect": why is not None,
        "why": why,
    }


def fit_components(
    combiner: Any,
    loss: Any,
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    rows: str = "labeled rows",
) -> dict[str, Any]:
    """Call ``combiner.fit`` and then ``loss.fit`` (those that exist) on the labeled rows.

    ``logits [K, N, C]`` are the teachers' outputs as the engine hands them to the combiner
    (standardized here when the loss standardizes), ``labels [N]`` (-1 rows are ignored by
    the fits). ``loss`` may be None (labeling); ``rows`` names the rows in messages.
    Returns ``{"fit_rows": ..., "combiner": ..., "loss": ...}`` (``check_fit_rows``, and the
    entries of the components that fitted) and logs one line for each. Where the teachers
    look trained on the rows, the combiner is fitted on no rows (one warning says so and
    what it does instead) and a loss that fits is refused.
    """
    if not can_fit(combiner) and not (loss is not None and can_fit(loss)):
        return {}
    if loss is not None and loss.standardize:
        logits = ops.standardize(logits, known)
    record: dict[str, Any] = {}
    with one_thread():
        record["fit_rows"] = check_fit_rows(logits, known, labels, rows)
        seen = bool(record["fit_rows"] and record["fit_rows"]["near_perfect"])
        if seen and loss is not None and can_fit(loss):
            raise UsageError(
                f"{named(loss, 'the loss')} is fitted on labeled rows (T=auto), and "
                f"{seen_rows(record['fit_rows'])}: a T chosen there would not carry to other "
                f"rows; {HINT}, or give a number for T"
            )
        if can_fit(combiner):
            fit_rows = slice(0, 0) if seen else slice(None)
            with running(combiner, "the combiner", " while fitting on the labeled rows"):
                fitted = combiner.fit(logits[:, fit_rows], known, labels[fit_rows])
            record["combiner"] = fitted
            unfitted = isinstance(fitted, dict) and fitted.get("fitted") is False
            if seen or unfitted:
                reason = seen_rows(record["fit_rows"]) if seen else f"no {rows}"
                if isinstance(fitted, dict):
                    fitted["reason"] = reason
                log.warning("%s", unfitted_line(combiner, fitted, reason, seen))
        if loss is not None and can_fit(loss):
            with running(loss, "the loss", " while fitting on the labeled rows"):
                record["loss"] = loss.fit(logits, known, labels, combiner)
    record = {part: fitted for part, fitted in record.items() if fitted}
    for line in describe(record):
        log.info("%s", line)
    return record


def named(component: Any, what: str) -> str:
    """How messages name a component: ``combiner 'auto'`` when a registry built it."""
    found = origin(component)
    return found[1] if found else what


def seen_rows(check: dict[str, Any]) -> str:
    """The near-perfect finding of ``check_fit_rows`` with its figures, in words."""
    accuracy = ", ".join(f"{a:.3f}" for a in check["teacher_accuracy"])
    return (
        f"the teachers look trained on the {check['rows']} {check['source']} ({check['why']}; "
        f"teacher accuracy {accuracy})"
    )


def unfitted_line(combiner: Any, record: Any, reason: str, seen: bool) -> str:
    """One warning: why the combiner is not fitted and what it does instead (its record's
    ``fallback``, when it says)."""
    name = named(combiner, "the combiner")
    said = isinstance(record, dict) and "fallback" in record
    instead = f"it combines {record['fallback']}" if said else "it was fitted on no rows"
    if seen:
        return (
            f"{reason}: a fit there would not carry to other rows, so {name} is not fitted; "
            f"{instead} ({HINT})"
        )
    return f"{name} is not fitted: {reason}; {instead}"


@torch.inference_mode()
def collect_outputs(
    producer: Any,
    source: Any,
    indices: Sequence[int],
    batch_size: int,
    device: torch.device,
    shared: bool = False,
    per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The producer's outputs on rows ``indices`` of ``source`` (``batch(indices)`` ->
    ``x, y, idx``; None with no rows): logits ``[K, N, C]`` and ``known [K, C]`` on the CPU,
    labels ``[N]``. ``per_batch(logits [K, B, C], known)`` -> ``[K, B, ...]`` keeps only
    that of each batch (e.g. the teachers' votes: ``[K, N]``, not the logits).
    Rows where a teacher gave NaN/Inf (``bad_rows``) are left out; with no rows, ``known``
    is the producer's ``known`` attribute. The teachers run under the device's autocast,
    as in training, label and cache, so what is fitted is applied to the same outputs.
    More than ``FIT_ROWS`` rows: a random ``FIT_ROWS`` of them (the same on every run), said
    in one line. ``shared`` (every rank calls it, as distill's fit): each rank runs the
    teachers on its share of the rows and every rank gets all of them, in the order of one
    process, so every rank fits the same tensors."""
    from kdplug.data import batches
    from kdplug.device import autocast

    if len(indices) > FIT_ROWS:
        log.info("fitting on a random %d of the %d labeled rows (FIT_ROWS)", FIT_ROWS, len(indices))
        indices = [indices[i] for i in fixed_sample(len(indices), FIT_ROWS).tolist()]
    rank, world = (distributed.rank(), distributed.world_size()) if shared else (0, 1)
    mine = list(indices)[rank::world]
    logits, labels, positions, known, seen = [], [], [], None, 0
    pin = device.type == "cuda"
    loader = batches(source, batch_size, indices=mine, pin_memory=pin) if mine else []
    for x, y, idx in loader:
        with autocast(device):
            out = producer(x.to(device), idx)
        keep = torch.ones(len(y), dtype=torch.bool)
        if out.bad_rows is not None:
            keep = ~out.bad_rows.cpu()
        kept = out.logits.float() if per_batch is None else per_batch(out.logits, out.known)
        logits.append(kept.cpu()[:, keep])
        labels.append(y[keep])
        positions.append((seen + torch.arange(len(y)))[keep])
        seen += len(y)
        known = out.known.cpu()
    known = producer.known.cpu() if known is None else known
    K, C = known.shape
    empty = torch.zeros(0, K, C) if per_batch is None else torch.zeros(0, K, dtype=torch.long)
    rows = torch.cat(logits, 1).transpose(0, 1) if logits else empty
    truth = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if world > 1:  # rank r's row i is row r + world * i of one process
        position = torch.cat(positions) * world + rank if positions else torch.zeros(0).long()
        order = distributed.gather_rows(position, device).argsort()
        rows = distributed.gather_rows(rows.contiguous(), device)[order]
        truth = distributed.gather_rows(truth, device)[order]
    return rows.transpose(0, 1), known, truth


def fit_on_rows(
    combiner: Any,
    loss: Any,
    producer: Any,
    source: Any,
    indices: Sequence[int],
    batch_size: int,
    device: torch.device,
    rows: str = "labeled rows",
    shared: bool = False,
) -> dict[str, Any]:
    """``fit_components`` on the producer's outputs for the labeled rows ``indices`` of
    ``source`` (``rows`` names them in messages; ``shared``: every rank fits, each running
    the teachers on its share, see ``collect_outputs``); nothing is run when neither
    component can fit."""
    if not can_fit(combiner) and not (loss is not None and can_fit(loss)):
        return {}
    logits, known, labels = collect_outputs(producer, source, indices, batch_size, device, shared)
    return fit_components(combiner, loss, logits, known, labels, rows)


def calibration_rows(spec: str, classes: list[str], producer: Any, data: str) -> Any:
    """``--calibration-data``: the DataSource of ``spec`` in the run's ``classes``, with a
    labeled row. Refused where a teacher of ``producer`` reads precomputed outputs by row
    index: its rows belong to ``data`` (named in the message), not to these."""
    from kdplug.data import load_data

    for name, teacher in zip(getattr(producer, "specs", None) or producer.names, producer.teachers):
        if getattr(teacher, "uses_row_index", False):
            raise UsageError(
                f"--calibration-data: teacher {name} reads precomputed outputs by row index, "
                f"and its rows belong to {data}; give its outputs on the calibration rows as "
                "another teacher, or leave out --calibration-data"
            )
    rows = load_data(spec, classes)
    if not (rows.labels() >= 0).any():
        raise UsageError(
            f"--calibration-data {spec}: no row is labeled with one of the run's classes "
            f"{classes[:20]}"
        )
    return rows


def describe(record: dict[str, Any]) -> list[str]:
    """One readable line for the fit rows and each fitted component of a
    ``fit_components`` record (an unfitted combiner has had its warning)."""
    lines = []
    for part, fitted in record.items():
        if part == "fit_rows":
            if fitted["near_perfect"]:
                continue  # the warning gave the figures
            accuracy = ", ".join(f"{a:.3f}" for a in fitted["teacher_accuracy"])
            lines.append(
                f"fit rows: {fitted['rows']} {fitted['source']} (teacher accuracy {accuracy})"
            )
        elif fitted.get("fitted") is not False:
            values = ", ".join(f"{k}={v}" for k, v in fitted.items() if v is not None)
            lines.append(f"{part} fitted on labeled rows: {values}")
    return lines
