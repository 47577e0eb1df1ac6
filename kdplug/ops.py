"""Small tensor helpers shared by the engines and by plugins (losses, combiners, generators).

Shapes: teacher logits ``[K, B, C]``, ``known`` ``[K, C]`` (bool: teacher k knows class c),
probabilities ``[..., C]`` summing to 1 over the last axis.
"""

from __future__ import annotations

import math

import torch

# The logit given to a class a teacher cannot predict (or that has probability 0): finite,
# so no NaN ever appears, and low enough that exp() of it is 0 at any usable temperature.
IMPOSSIBLE = -1e4


def masked_log_softmax(
    logits: torch.Tensor, known: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the classes in ``known``.

    Known logits are floored at IMPOSSIBLE and unknown classes sit below that floor, so
    an unknown class never gets mass, even from a teacher whose logits are all at the floor.
    """
    return torch.log_softmax(_masked(logits, known, temperature), dim=-1)


def teacher_probs(
    logits: torch.Tensor, known: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Each teacher's probabilities at temperature T, renormalized over the classes it knows
    (``masked_log_softmax(...).exp()``, in one softmax)."""
    return torch.softmax(_masked(logits, known, temperature), dim=-1)


def _masked(logits: torch.Tensor, known: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """``logits / T`` floored at IMPOSSIBLE, with the unknown classes at twice that: a new
    tensor, made in one pass (a clamp between per-class bounds: ``[IMPOSSIBLE, inf]`` for a
    known class, ``[2 IMPOSSIBLE, 2 IMPOSSIBLE]`` for an unknown one)."""
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    if known is None:
        return z.clamp_min(IMPOSSIBLE)
    mask = known if known.dim() == z.dim() else known.unsqueeze(-2)
    floor = torch.where(mask, IMPOSSIBLE, 2 * IMPOSSIBLE).to(z.dtype)
    ceiling = torch.where(mask, math.inf, 2 * IMPOSSIBLE).to(z.dtype)
    return torch.clamp(z, floor, ceiling)


def standardize(
    logits: torch.Tensor,
    known: torch.Tensor | None = None,
    eps: float = 1e-6,
    skip_impossible: bool = True,
) -> torch.Tensor:
    """Logit standardization (Sun et al. 2024): z-score each logit vector over known classes.

    The spread is the sample standard deviation (n - 1), as in the authors' code
    (``torch.std``). With ``skip_impossible`` (teachers' logits) a logit at or below
    ``IMPOSSIBLE / 2`` marks a class of probability 0: it is left out of the mean and the
    spread and stays IMPOSSIBLE. A student's logits are z-scored whole
    (``skip_impossible=False``), however low they are.
    """
    z = logits.float()
    if known is None:
        known = torch.ones(z.shape[-1], dtype=torch.bool, device=z.device)
    valid = (known if known.dim() == z.dim() else known.unsqueeze(-2)).expand_as(z)
    if skip_impossible:
        valid = valid & (z > IMPOSSIBLE / 2)
    count = valid.sum(-1, keepdim=True)
    mean = (z * valid).sum(-1, keepdim=True) / count.clamp_min(1)
    var = (((z - mean) * valid) ** 2).sum(-1, keepdim=True) / (count - 1).clamp_min(1)
    # clamp before sqrt: its gradient at var = 0 (all logits equal) would be NaN
    out = (z - mean) / (var.clamp_min(eps * eps).sqrt() + eps)
    return torch.where(valid, out, torch.full_like(out, IMPOSSIBLE))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis; 0·log 0 counts as 0.

    ``p · log p`` is NaN exactly where ``p`` is 0 (``0 · -inf``) or NaN, and ``nansum``
    counts those as 0: twice as fast on the CPU as ``xlogy``, and one temporary tensor
    where no gradient is needed."""
    terms = probs.log()
    terms = terms * probs if terms.requires_grad else terms.mul_(probs)
    return -terms.nansum(-1)


def argmax(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(-1)`` (int64; the first of equal maxima, NaN above all), on the CPU
    through numpy, whose vectorized argmax is about 4x torch's at 1,000 classes."""
    if values.device.type != "cpu" or values.requires_grad or values.dtype == torch.bfloat16:
        return values.argmax(-1)
    return torch.from_numpy(values.numpy().argmax(-1))


def normalize_weights(weights: torch.Tensor, dim: int = 0, in_place: bool = False) -> torch.Tensor:
    """Non-negative weights rescaled to sum to 1 along ``dim`` (uniform where all are 0);
    ``in_place``: in ``weights`` itself (no copy of a large tensor)."""
    weights = weights.clamp_min_(0) if in_place else weights.clamp_min(0)
    total = weights.sum(dim, keepdim=True)
    weights.div_(total.clamp_min(1e-30))
    return weights.masked_fill_(total <= 0, 1.0 / weights.shape[dim])
