"""The label engine's shards as a label generator sees them (generator contract version 2).

``kdplug label`` first runs the teachers over DATA shard by shard (``kdplug.shards``). A
generator then sees the good rows (no teacher gave NaN/Inf) one shard at a time, as
``ShardRows``: ``prepare(shards)`` may pass over all of them (a ``LabelShards``, read from
disk each time it is iterated) to gather what it needs, then ``decide(rows)`` is called
once per shard, in row order, and ``summary()`` once at the end. Memory is one shard's
tensors plus what the generator keeps: never ``[N, C]``.

``StreamingGenerator`` is the base of kdplug's own generators; ``AllRows`` runs a version-1
generator (only ``generator(target, teacher_probs, known)`` on all rows) in the same engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdplug.components import Labels
from kdplug.errors import origin, record_origin
from kdplug.ops import argmax

log = logging.getLogger("kdplug")


@dataclass
class ShardRows:
    """The good rows of one shard."""

    index: torch.Tensor  # [R] int64: the rows' positions in DATA
    target: torch.Tensor  # [R, C] float32: the combined prediction (rows sum to 1)
    votes: torch.Tensor  # [K, R] int64: each teacher's most probable class
    known: torch.Tensor  # [K, C] bool: teacher k can predict class c
    teacher_probs: torch.Tensor | None = None  # [K, R, C], for a generator that asks for them

    def __len__(self) -> int:
        return len(self.index)


class LabelShards:
    """Every shard's good rows, in row order: ``for rows in shards`` reads them afresh (one
    shard in memory at a time), as often as a generator iterates."""

    def __init__(self, loaders: Sequence[Callable[[], ShardRows]], rows: int, known: torch.Tensor):
        self._loaders = list(loaders)
        self.rows = rows  # good rows in all shards
        self.known = known  # [K, C]

    @classmethod
    def of(cls, parts: Sequence[ShardRows]) -> LabelShards:
        """Shards held in memory (the all-rows call, tests)."""
        return cls([lambda part=part: part for part in parts], sum(map(len, parts)), parts[0].known)

    def __iter__(self) -> Iterator[ShardRows]:
        for load in self._loaders:
            yield load()

    def __len__(self) -> int:
        return len(self._loaders)

    @property
    def classes(self) -> int:
        return self.known.shape[1]

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every good row's confidence (``target.max``, float64) and class (``target.argmax``),
        ``[rows]`` each: 16 bytes a row, read shard by shard."""
        confidence, predicted = [], []
        for rows in self:
            confidence.append(rows.target.amax(1).double())
            predicted.append(argmax(rows.target))
        return torch.cat(confidence), torch.cat(predicted)


def hard_labels(target: torch.Tensor, accepted: torch.Tensor, probs: torch.Tensor | None = None):
    """``Labels`` with the argmax of ``target`` where ``accepted`` [R] and -1 elsewhere."""
    label = torch.where(accepted, argmax(target), torch.full_like(accepted, -1, dtype=torch.long))
    return Labels(label, accepted, target if probs is None else probs)


class StreamingGenerator:
    """Base of a streaming label generator: the contract's defaults, and the all-rows call
    of version 1 (``generator(target [N, C], teacher_probs [K, N, C], known [K, C])``) as
    ``prepare`` and ``decide`` over one shard holding every row."""

    topk: int | None = None
    private: bool = False
    teacher_probs: bool = False
    fit: Callable[..., dict[str, Any]] | None = None

    def prepare(self, shards: LabelShards) -> None:
        """Nothing to gather over the shards."""

    def decide(self, rows: ShardRows) -> Labels:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        return {}

    def __call__(
        self, target: torch.Tensor, teacher_probs: torch.Tensor, known: torch.Tensor
    ) -> Labels:
        rows = ShardRows(
            torch.arange(target.shape[0]), target, teacher_probs.argmax(-1), known, teacher_probs
        )
        self.prepare(LabelShards.of([rows]))
        decided = self.decide(rows)
        return Labels(decided.label, decided.accepted, decided.probs, self.summary())


class AllRows:
    """A version-1 generator (only ``__call__`` on all rows) in the streaming engine.

    ``prepare`` joins every shard's target and teacher probabilities in memory
    (``(K + 1) * N * C * 4`` bytes: 20 GB for 1.28M rows of 1,000 classes and 3 teachers)
    and calls the generator once; ``decide`` hands out each shard's rows of its answer."""

    teacher_probs = True

    def __init__(self, generator: Any):
        self.generator = generator
        self.topk = getattr(generator, "topk", None)
        self.private = getattr(generator, "private", False)
        self.fit = getattr(generator, "fit", None)
        self.labels: Labels | None = None
        self.offset = 0

    def prepare(self, shards: LabelShards) -> None:
        parts = list(shards)
        target = torch.cat([p.target for p in parts])
        probs = torch.cat([p.teacher_probs for p in parts], dim=1)
        if len(parts) > 1:
            log.info(
                "label generator %s takes all %d rows at once (contract version 1): they are "
                "held in memory together (%.1f GB)",
                type(self.generator).__name__,
                len(target),
                (target.numel() + probs.numel()) * 4 / 1e9,
            )
        self.labels = self.generator(target, probs, shards.known)
        self.offset = 0
        problem = shape_problem(self.labels, *target.shape)
        if problem:
            raise ValueError(problem)

    def decide(self, rows: ShardRows) -> Labels:
        decided, start, stop = self.labels, self.offset, self.offset + len(rows)
        self.offset = stop
        return Labels(
            decided.label[start:stop], decided.accepted[start:stop], decided.probs[start:stop]
        )

    def summary(self) -> dict[str, Any]:
        return dict(self.labels.info) if self.labels is not None else {}


def shape_problem(decided: Any, R: int, C: int) -> str | None:
    """What is wrong with the shapes of a decision on ``R`` rows of ``C`` classes (its
    ``label``, ``accepted`` and ``probs``), or None."""
    for attr, shape in (("label", (R,)), ("accepted", (R,)), ("probs", (R, C))):
        value = getattr(decided, attr, None)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"returned {attr} of shape {got}, expected {shape}"
    return None


def streaming(generator: Any) -> Any:
    """``generator`` if it has ``decide`` (version 2), else wrapped in ``AllRows`` (which
    errors name as the generator's plugin)."""
    if hasattr(generator, "decide"):
        return generator
    wrapper = AllRows(generator)
    found = origin(generator)
    if found is not None:
        record_origin(wrapper, *found)
    return wrapper
