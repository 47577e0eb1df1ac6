"""Full distributions from stored top-k log-probabilities (FKD, Shen & Xing 2022).

A top-k store keeps, per view and teacher, the k largest log-probabilities ``log p_i`` and
their classes. The rebuilt distribution keeps those k probabilities exactly and spreads the
remaining mass ``m = 1 - sum_i p_i`` evenly over the other classes the teacher knows.
Its KL divergence from the full distribution is ``m * KL(tail / m || uniform)``, at most
``m * log(C_known - k)``; it is 0 when the tail was uniform already.
"""

from __future__ import annotations

import torch

from kdplug.ops import IMPOSSIBLE

# the least mass left to the tail, so its classes never get log(0)
MIN_TAIL_MASS = 1e-12


def full_log_probs(
    values: torch.Tensor, indices: torch.Tensor | None, known: torch.Tensor
) -> torch.Tensor:
    """``[T, B, C]`` log-probabilities from stored ``values [T, B, k]`` at class
    ``indices [T, B, k]`` (None: ``values`` hold all C classes); ``known [T, C]`` bool.

    Classes a teacher does not know get IMPOSSIBLE.
    """
    values = values.float().clamp_min(IMPOSSIBLE)
    T, B, _ = values.shape
    mask = known.to(values.device)[:, None, :].expand(T, B, known.shape[1])
    if indices is None:
        return values.masked_fill(~mask, IMPOSSIBLE)
    indices = indices.long()
    top_known = torch.gather(mask, 2, indices)
    values = values.masked_fill(~top_known, IMPOSSIBLE)
    mass = 1 - values.exp().masked_fill(~top_known, 0).sum(-1)  # [T, B]
    in_top = torch.zeros(mask.shape, dtype=torch.bool, device=values.device)
    in_top.scatter_(2, indices, True)
    tail = mask & ~in_top
    count = tail.sum(-1).clamp_min(1)
    tail_value = torch.log(mass.clamp_min(MIN_TAIL_MASS) / count)  # [T, B]
    out = torch.where(tail, tail_value[..., None], values.new_full(mask.shape, IMPOSSIBLE))
    return out.scatter_(2, indices, values)
