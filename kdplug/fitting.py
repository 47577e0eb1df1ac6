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
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from kdplug import metrics, ops
from kdplug.errors import running

log = logging.getLogger("kdplug")

# the distillation temperatures T=auto chooses from: KD softens targets, never sharpens
TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
FOLDS = 5


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
    return ~torch.isfinite(flat).all(1) | (flat < -tolerance).any(1)


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


def fit_components(
    combiner: Any,
    loss: Any,
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, Any]:
    """Call ``combiner.fit`` and then ``loss.fit`` (those that exist) on the labeled rows.

    ``logits [K, N, C]`` are the teachers' outputs as the engine hands them to the combiner
    (standardized here when the loss standardizes), ``labels [N]`` (-1 rows are ignored by
    the fits). ``loss`` may be None (labeling). Returns ``{"combiner": ..., "loss": ...}``
    with the entries of the components that fitted, and logs one line for each.
    """
    if loss is not None and loss.standardize:
        logits = ops.standardize(logits, known)
    record: dict[str, Any] = {}
    with one_thread():
        if can_fit(combiner):
            with running(combiner, "the combiner", " while fitting on the labeled rows"):
                record["combiner"] = combiner.fit(logits, known, labels)
        if loss is not None and can_fit(loss):
            with running(loss, "the loss", " while fitting on the labeled rows"):
                record["loss"] = loss.fit(logits, known, labels, combiner)
    record = {part: fitted for part, fitted in record.items() if fitted}
    for line in describe(record):
        log.info("%s", line)
    return record


@torch.inference_mode()
def collect_outputs(
    producer: Any, source: Any, indices: Sequence[int], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The producer's outputs on rows ``indices`` of ``source`` (``batch(indices)`` ->
    ``x, y, idx``; None with no rows): logits ``[K, N, C]`` and ``known [K, C]`` on the CPU,
    labels ``[N]``.
    Rows where a teacher gave NaN/Inf (``bad_rows``) are left out; with no rows, ``known``
    is the producer's ``known`` attribute."""
    from kdplug.data import batches

    logits, labels, known = [], [], None
    loader = batches(source, batch_size, indices=list(indices)) if len(indices) else []
    for x, y, idx in loader:
        out = producer(x.to(device), idx.to(device))
        keep = torch.ones(len(y), dtype=torch.bool)
        if out.bad_rows is not None:
            keep = ~out.bad_rows.cpu()
        logits.append(out.logits.float().cpu()[:, keep])
        labels.append(y[keep])
        known = out.known.cpu()
    if known is None:
        known = producer.known.cpu()
        return torch.zeros(*known.shape[:1], 0, known.shape[1]), known, torch.zeros(0).long()
    return torch.cat(logits, 1), known, torch.cat(labels)


def fit_on_rows(
    combiner: Any,
    loss: Any,
    producer: Any,
    source: Any,
    indices: Sequence[int],
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """``fit_components`` on the producer's outputs for the labeled rows ``indices`` of
    ``source``; nothing is run when neither component can fit."""
    if not can_fit(combiner) and not (loss is not None and can_fit(loss)):
        return {}
    logits, known, labels = collect_outputs(producer, source, indices, batch_size, device)
    return fit_components(combiner, loss, logits, known, labels)


def describe(record: dict[str, Any]) -> list[str]:
    """One readable line per fitted component of a ``fit_components`` record."""
    return [
        f"{part} fitted on labeled rows: "
        + ", ".join(f"{key}={value}" for key, value in fitted.items() if value is not None)
        for part, fitted in record.items()
    ]
