"""Teacher selection: greedy backward elimination on the ensemble's held-out NLL.

Starting from all K teachers, each round scores the ensemble without each remaining
teacher and removes the one whose removal lowers the held-out NLL the most, if it lowers
it by more than one standard error of the per-row difference (so that a gain within the
noise of a small labeled split removes nobody); it stops when no removal does. The NLL of
an ensemble is that of its combined prediction on the labeled rows, each row's from a
combiner fitted without it (``kdplug.fitting.held_out_prediction``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kdplug.fitting import FOLDS, held_out_prediction, one_thread


def row_nll(
    make_combiner: Callable[[], Any],
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    folds: int = FOLDS,
) -> torch.Tensor:
    """Held-out NLL ``[N]`` of each labeled row under the combined prediction of ``logits
    [K, N, C]`` (probabilities clipped at 1e-12, as ``kdplug.metrics.nll``)."""
    return prediction_nll(
        held_out_prediction(make_combiner(), logits, known, labels, folds), labels
    )


def prediction_nll(prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL ``[N]`` of the labeled rows' labels under ``prediction [N, C]`` (one row per
    labeled row, in order), probabilities clipped at 1e-12."""
    y = labels[labels >= 0].long()
    return -prediction[torch.arange(len(y)), y].double().clamp_min(1e-12).log()


def backward_elimination(
    make_combiner: Callable[[], Any],
    logits: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    folds: int = FOLDS,
    all_nll: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Flag the teachers whose removal lowers the ensemble's held-out NLL (greedily, one
    per round) and recommend the rest. ``make_combiner()`` builds a fresh combiner;
    ``names`` name the K teachers; ``all_nll``: the held-out NLL of all K, where the
    caller has it already (``row_nll``'s). Returns a JSON-ready record of every round."""

    def score(subset: list[int]) -> torch.Tensor:
        if all_nll is not None and len(subset) == len(names):
            return all_nll
        return row_nll(make_combiner, logits[subset], known[subset], labels, folds)

    with one_thread():
        return _eliminate(score, names)


def _eliminate(score: Callable[[list[int]], torch.Tensor], names: Sequence[str]) -> dict[str, Any]:
    kept = list(range(len(names)))
    current = score(kept)
    start, rounds, removed = float(current.mean()), [], []
    while len(kept) > 1:
        without = {k: score([j for j in kept if j != k]) for k in kept}
        best = min(without, key=lambda k: float(without[k].mean()))
        gain = current - without[best]  # per row: positive where removing helps
        se = float(gain.std() / math.sqrt(len(gain))) if len(gain) > 1 else math.inf
        rounds.append(
            {
                "nll": float(current.mean()),
                "without": {names[k]: float(v.mean()) for k, v in without.items()},
                "gain": float(gain.mean()),
                "standard_error": se,
            }
        )
        if not float(gain.mean()) > se:
            break
        removed.append(
            {"teacher": names[best], "index": best, "nll_without": float(without[best].mean())}
        )
        kept.remove(best)
        current = without[best]
    return {
        "nll_all": start,
        "flagged": removed,
        "recommended": [names[k] for k in kept],
        "recommended_indices": kept,
        "nll_recommended": float(current.mean()),
        "rounds": rounds,
    }
