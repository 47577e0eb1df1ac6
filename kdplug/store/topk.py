"""Full distributions from stored top-k log-probabilities (FKD, Shen & Xing 2022).

A top-k store keeps, per view and teacher, the k largest log-probabilities ``log p_i``, their
classes, and the log of the mass left outside them, ``log m`` with ``m = 1 - sum_i p_i``.
The rebuilt distribution keeps the k probabilities and spreads ``m`` evenly over the other
classes the teacher knows, as FKD does. ``m`` is stored rather than recomputed from the
rounded top-k values, so a float16 store keeps small tails (a float16 ``log p`` near -1 is
off by up to 5e-4, more than many tails weigh); the result is renormalized to sum to 1.
The KL divergence of the rebuilt distribution from the full one is
``m * KL(tail / m || uniform)``, at most ``m * log(C_known - k)``, and 0 when the tail was
uniform already.
"""

from __future__ import annotations

import torch

from kdplug.ops import IMPOSSIBLE

# a rest of the softmax's terms below this (relative to the largest term, 1) is summed
# exactly by log-sum-exp: float32 terms near their underflow (1e-38) lose precision
TINY_TAIL = 1e-20


def top_k_entries(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a top-k store keeps of ``log_softmax(scores [..., C])``: the top-k ``values
    [..., k]``, their ``indices [..., k]`` and the log of the remaining mass ``tail [...]``,
    floored at ``2 * IMPOSSIBLE``.

    One exponential pass serves the normalizer and the tail: the mass outside the top-k is
    summed from its own terms (no ``1 - top`` cancellation); rows whose tail is too small
    for float32 terms (``TINY_TAIL``) take the exact log-sum-exp of their rest instead."""
    scores = scores.float()
    values, indices = scores.topk(k, dim=-1)
    shift = scores.amax(-1, keepdim=True)
    terms = (scores - shift).exp_()
    log_total = terms.sum(-1).log_() + shift.squeeze(-1)
    rest = terms.scatter_(-1, indices, 0.0).sum(-1)
    tail = rest.log() + shift.squeeze(-1) - log_total
    tiny = rest < TINY_TAIL
    if bool(tiny.any()):
        others = scores[tiny].scatter(-1, indices[tiny], float("-inf"))
        tail[tiny] = torch.logsumexp(others, dim=-1) - log_total[tiny]
    values = (values - log_total[..., None]).clamp_min(2 * IMPOSSIBLE)
    return values, indices, tail.clamp_min(2 * IMPOSSIBLE)


def full_log_probs(
    values: torch.Tensor,
    indices: torch.Tensor | None,
    tail: torch.Tensor | None,
    known: torch.Tensor,
) -> torch.Tensor:
    """``[T, B, C]`` log-probabilities from stored ``values [T, B, k]`` at class
    ``indices [T, B, k]`` with remaining log-mass ``tail [T, B]`` (indices and tail None:
    ``values`` hold all C classes); ``known [T, C]`` bool.

    Classes a teacher does not know get IMPOSSIBLE.
    """
    values = values.float().clamp_min(IMPOSSIBLE)
    T, B, _ = values.shape
    mask = known.to(values.device)[:, None, :].expand(T, B, known.shape[1])
    if indices is None:
        return values.masked_fill(~mask, IMPOSSIBLE)
    indices = indices.long()
    top_known = torch.gather(mask, 2, indices)
    in_top = torch.zeros(mask.shape, dtype=torch.bool, device=values.device)
    in_top.scatter_(2, indices, True)
    others = mask & ~in_top
    count = others.sum(-1)  # [T, B]
    tail = tail.float()
    top_mass = values.exp().masked_fill(~top_known, 0).sum(-1)
    tail_mass = torch.where(count > 0, tail.exp(), torch.zeros_like(tail))
    log_total = torch.log(top_mass + tail_mass)
    spread = (tail - torch.log(count.clamp_min(1)) - log_total).clamp_min(IMPOSSIBLE)
    out = torch.where(others, spread[..., None], values.new_full(mask.shape, IMPOSSIBLE))
    top = (values - log_total[..., None]).clamp_min(IMPOSSIBLE).masked_fill(~top_known, IMPOSSIBLE)
    return out.scatter_(2, indices, top)
