"""Flags on teachers that would quietly spoil a run, raised by every command that sees them.

- ``near_chance``: on the labeled rows of the classes it knows, a teacher's accuracy is
  less than ``NEAR_CHANCE`` of the way from chance (always answering the most frequent
  class) to perfect: wrong input preprocessing, a wrong class order, another label space.
- ``disagrees``: a teacher agrees with every other teacher on fewer than ``DISAGREE`` of
  the rows both can answer. A teacher whose labeled accuracy is fine is not flagged for it
  (the others are the odd ones). Where a teacher that names its classes (aligned by name)
  and one that does not (taken in the run's class order) disagree, the flag says to check
  the class order.
- ``lacks_classes``: a teacher that names its classes lacks some of the run's (it abstains
  on them); ``class_notes`` finds these when the teacher set is built.

Each flag is logged as a WARNING naming the teacher with its figures, and returned as a
JSON-ready dict that the command writes into its JSON output (``teacher_checks``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

import torch

from kdplug.ops import argmax

log = logging.getLogger("kdplug")

NEAR_CHANCE = 0.2  # of the way from chance to perfect accuracy
DISAGREE = 0.1  # agreement with every other teacher below this: disagrees on nearly every row
MIN_ROWS = 20  # fewer rows than this say too little to flag anything


def check_teachers(
    producer: Any,
    scores: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor | None,
    rows: str,
    compare: bool = True,
    votes: torch.Tensor | None = None,
    fine: Collection[int] = (),
) -> list[dict[str, Any]]:
    """``flag_teachers`` for the teachers of ``producer`` (a ``kdplug.teachers.TeacherSet``,
    which says which teachers name their classes, or any ``Producer``) on their outputs
    ``scores [K, N, C]`` (or, given instead, their class ``votes [K, N]``) and ``known
    [K, C]`` for ``rows``; ``fine``: teachers found accurate on other labeled rows."""
    teacher_set = live_teachers(producer)
    return flag_teachers(
        producer.names,
        scores,
        known,
        labels,
        named=teacher_set.named if teacher_set else None,
        classes=teacher_set.classes if teacher_set else None,
        rows=rows,
        compare=compare,
        predicted=votes,
        fine=fine,
    )


def live_teachers(producer: Any) -> Any:
    """``producer`` when it is the live teachers (a ``kdplug.teachers.TeacherSet``), else
    None (a store)."""
    from kdplug.teachers import TeacherSet

    return producer if isinstance(producer, TeacherSet) else None


def check_on_rows(
    producer: Any,
    source: Any,
    indices: Sequence[int],
    batch_size: int,
    device: torch.device,
    rows: str,
    compare: bool = True,
) -> tuple[list[dict[str, Any]], set[int]]:
    """``check_teachers`` on the producer's votes for rows ``indices`` of ``source``
    (``kdplug.fitting.collect_outputs``; each batch's logits are dropped once voted): the
    flags, and the teachers found accurate there (``accurate_teachers``), which need not
    be flagged for disagreeing on other rows."""
    from kdplug.fitting import collect_outputs

    if not len(indices):
        return [], set()
    votes, known, labels = collect_outputs(
        producer, source, indices, batch_size, device, per_batch=teacher_votes
    )
    flags = check_teachers(producer, None, known, labels, rows, compare, votes=votes)
    return flags, accurate_teachers(judge(votes, labels, known))


def teacher_votes(scores: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``[K, N]``: each teacher's most probable class among those it knows, of its logits or
    probabilities ``scores [K, N, C]`` (``known [K, C]``)."""
    unknown = ~known.to(scores.device).unsqueeze(1)
    return argmax(scores.detach().float().masked_fill(unknown, float("-inf")))


def record(producer: Any, flags: list[dict[str, Any]]) -> dict[str, Any]:
    """What a command writes into its JSON output as ``teacher_checks``: what each live
    teacher is fed (``inputs``; None for a store) and every flag, the class notes first."""
    teacher_set = live_teachers(producer)
    if teacher_set is None:
        return {"inputs": None, "flags": flags}
    return {"inputs": teacher_set.inputs, "flags": [*teacher_set.class_notes, *flags]}


def flag_teachers(
    names: Sequence[str],
    scores: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    named: Sequence[bool] | None = None,
    classes: Sequence[str] | None = None,
    rows: str = "rows",
    compare: bool = True,
    predicted: torch.Tensor | None = None,
    fine: Collection[int] = (),
) -> list[dict[str, Any]]:
    """The flags of the teachers ``names`` on their outputs ``scores [K, N, C]`` (logits or
    probabilities, aligned to the run's classes), ``known [K, C]`` and ``labels [N]`` (-1
    unknown; None: no labels). ``named[k]``: teacher k names its classes; ``classes``: the
    run's, in order; ``rows`` says which rows these are; ``compare=False`` leaves out the
    disagreement check (done on other rows). ``predicted [K, N]``: each teacher's class
    among those it knows, given instead of ``scores``. A teacher accurate on the labeled
    rows (here, or ``fine``: on other labeled rows) is not flagged for disagreeing."""
    known = known.cpu()
    predicted = teacher_votes(scores.cpu(), known) if predicted is None else predicted.cpu()
    flags, fine = [], set(fine)
    if labels is not None:
        judged = judge(predicted, labels, known)
        flags += [
            near_chance_flag(name, figures, rows)
            for name, figures in zip(names, judged)
            if figures is not None and near_chance(figures)
        ]
        fine |= accurate_teachers(judged)
    if compare and len(names) > 1:
        agree, counts = agreement(predicted, known)
        for k in range(len(names)):
            flag = disagreement_flag(k, list(names), agree, counts, named, classes, rows)
            if flag is not None and k not in fine:
                flags.append(flag)
    for flag in flags:
        log.warning("%s", flag["message"])
    return flags


def labeled_accuracy(
    predicted: torch.Tensor, labels: torch.Tensor, known: torch.Tensor
) -> dict[str, Any] | None:
    """Accuracy and chance (the most frequent class's share) of one teacher's predictions
    ``[N]`` on the labeled rows of the classes it knows; None on too few rows or one class."""
    rows = labels >= 0
    rows[rows.clone()] = known[labels[rows]]
    y = labels[rows]
    if len(y) < MIN_ROWS or len(y.unique()) < 2:
        return None
    return {
        "accuracy": round(float((predicted[rows] == y).float().mean()), 4),
        "chance": round(float(torch.bincount(y).max()) / len(y), 4),
        "rows": len(y),
    }


def near_chance(figures: dict[str, Any]) -> bool:
    """Whether ``labeled_accuracy``'s figures are less than ``NEAR_CHANCE`` of the way from
    chance to perfect accuracy."""
    return figures["accuracy"] < figures["chance"] + NEAR_CHANCE * (1 - figures["chance"])


def judge(predicted: torch.Tensor, labels: Any, known: torch.Tensor) -> list[dict | None]:
    """``labeled_accuracy`` of each teacher's votes ``predicted [K, N]`` on the labeled rows
    ``labels [N]``."""
    labels = torch.as_tensor(labels).long().cpu()
    return [labeled_accuracy(p, labels, k) for p, k in zip(predicted.cpu(), known.cpu())]


def accurate_teachers(judged: Sequence[dict | None]) -> set[int]:
    """The teachers (positions) that ``judge`` found clear of chance (those judged on too
    few rows are not among them)."""
    return {k for k, figures in enumerate(judged) if figures and not near_chance(figures)}


def near_chance_flag(name: str, figures: dict[str, Any], rows: str) -> dict[str, Any]:
    message = (
        f"teacher {name} is near chance on {figures['rows']} labeled {rows}: accuracy "
        f"{figures['accuracy']:.3f} against {figures['chance']:.3f} for always answering the "
        "most frequent class; check what it is fed (its size, mean and std) and its class "
        "order (--classes, or classes=a;b;... on its spec)"
    )
    return {"teacher": name, "check": "near_chance", **figures, "message": message}


def agreement(predicted: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, K]`` share of rows on which two teachers predict the same class, and how many
    rows that is over: those where each predicts a class the other knows."""
    K = len(predicted)
    agree, counts = torch.ones(K, K), torch.zeros(K, K, dtype=torch.long)
    for i in range(K):
        for j in range(K):
            both = known[i][predicted[j]] & known[j][predicted[i]]
            counts[i, j] = int(both.sum())
            if i != j and counts[i, j]:
                agree[i, j] = (predicted[i][both] == predicted[j][both]).float().mean()
    return agree, counts


def disagreement_flag(
    k: int,
    names: list[str],
    agree: torch.Tensor,
    counts: torch.Tensor,
    named: Sequence[bool] | None,
    classes: Sequence[str] | None,
    rows: str,
) -> dict[str, Any] | None:
    """The flag of teacher ``k`` when it agrees with every other teacher (on enough rows) on
    fewer than ``DISAGREE`` of the rows, else None."""
    others = [j for j in range(len(names)) if j != k and counts[k, j] >= MIN_ROWS]
    if not others or any(agree[k, j] >= DISAGREE for j in others):
        return None
    shares = {names[j]: round(float(agree[k, j]), 4) for j in others}
    listed = ", ".join(f"{share:.1%} with {other}" for other, share in shares.items())
    message = (
        f"teacher {names[k]} disagrees with every other teacher on nearly every one of the "
        f"{int(counts[k, others].max())} {rows}: it agrees on {listed}"
    )
    hint = class_order_hint(k, others, names, named, classes)
    message += f"; {hint}" if hint else "; check what each teacher is fed and its classes"
    return {
        "teacher": names[k],
        "check": "disagrees",
        "agreement": shares,
        "rows": int(counts[k, others].max()),
        "message": message,
    }


def class_order_hint(
    k: int,
    others: list[int],
    names: list[str],
    named: Sequence[bool] | None,
    classes: Sequence[str] | None,
) -> str | None:
    """Where a teacher that names its classes and one that does not disagree: the unnamed
    one's outputs are taken in the run's class order, which may be wrong."""
    if named is None:
        return None
    pairs = [j for j in others if named[j] != named[k]]
    if not pairs:
        return None
    unnamed = [names[k]] if not named[k] else [names[j] for j in pairs]
    aligned = [names[j] for j in pairs] if not named[k] else [names[k]]
    order = f" {list(classes)[:20]}" if classes is not None else ""
    return (
        f"{', '.join(aligned)} names its classes and is aligned to the run's by name, while "
        f"{', '.join(unnamed)} names none, so its outputs are taken in the run's class "
        f"order{order}: check that order (--classes), or give the unnamed teacher its "
        "classes (classes=a;b;... on its spec)"
    )


def class_notes(
    names: Sequence[str], teacher_classes: Sequence[Sequence[Any] | None], classes: Sequence[str]
) -> list[dict[str, Any]]:
    """Teachers that name their classes, checked against the run's: a WARNING and a flag
    for each that lacks run classes (it abstains on them), an INFO line for classes it has
    beyond the run's (their outputs are left out)."""
    flags = []
    run = [str(c) for c in classes]
    for name, own in zip(names, teacher_classes):
        if own is None:
            continue
        own = [str(c) for c in own]
        lacking = [c for c in run if c not in set(own)]
        extra = [c for c in own if c not in set(run)]
        if extra:
            log.info(
                "teacher %s has %d classes the run lacks, left out: %s",
                name,
                len(extra),
                extra[:20],
            )
        if lacking:
            message = (
                f"teacher {name} names {len(own)} classes and lacks {len(lacking)} of the run's "
                f"{len(run)}: {lacking[:20]}; it abstains on them (teachers that name their "
                "classes are aligned to the run's by name: check the spelling, or give "
                "classes=a;b;... on its spec)"
            )
            log.warning("%s", message)
            flags.append(
                {"teacher": name, "check": "lacks_classes", "lacks": lacking, "message": message}
            )
    return flags
