"""Dawid-Skene (1979): EM over per-teacher confusion matrices, without ground truth.

Teacher k has a label it would say, ``l``, with ``theta_k[c, l] = P(k says l | true class
c)``; classes have priors ``pi``. What the EM sees of row i from teacher k is its evidence
``e_ik [C]``: the one-hot vote (``soft=false``: classic Dawid-Skene), or with ``soft`` (the
default) the teacher's probabilities over ``l`` divided by their mean over the rows,
``p_ik(l) / mean_j p_jk(l)`` (by Bayes' rule the likelihood of what the teacher saw, up
to a factor, if ``p_ik`` is its posterior over ``l``). A one-hot ``p`` is exactly a vote.

    E-step: L_ik(c) = sum_l theta_k[c, l] e_ik(l);  q_i(c) ∝ pi_c prod_k L_ik(c)
    M-step: pi_c = mean_i q_i(c);  theta_k[c, l] ∝ n_k[c, l] + smoothing, with the expected
            counts n_k[c, l] = sum_i q_i(c) theta_k[c, l] e_ik(l) / L_ik(c)

The posteriors ``q [N, C]`` start from ``init`` (``vote``: the teachers' vote shares;
``mean``: the mean of their probabilities) and the first counts are the votes'; it stops
when no posterior moves by more than ``tol``. For votes the counts are
``sum_i q_i(c) v_ik(l)`` and ``log L = log theta_k[c, v]``: the classic algorithm.

It streams: each EM iteration is one pass over the label engine's shards, keeping only
``pi``, ``theta`` and the counts (``O(K C^2)``); a row's posterior is recomputed from the
parameters when needed (the convergence check computes it under the previous parameters
too, so an iteration costs two E-steps). With ``soft`` an E-step is a ``[R, C] x [C, C]``
product per teacher and shard (in float32; the expected counts in float64, so the sums over
the rows do not depend on how shards cut them): at 1,000 classes, much slower than voting.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kdplug.api import (
    Labels,
    LabelShards,
    Progress,
    ShardRows,
    StreamingGenerator,
    hard_labels,
)

INITS = ("vote", "mean")
TINY = 1e-300
BLOCK = 2048  # rows per E-step: its [K, rows, C] float64 temporaries stay near 50 MB each


def blocks(parts) -> Iterator[ShardRows]:
    """The rows of each ``ShardRows`` in ``parts``, ``BLOCK`` at a time."""
    for rows in parts:
        for start in range(0, len(rows), BLOCK):
            cut = slice(start, start + BLOCK)
            probs = rows.teacher_probs
            yield ShardRows(
                rows.index[cut],
                rows.target[cut],
                rows.votes[:, cut],
                rows.known,
                None if probs is None else probs[:, cut],
            )


@dataclass
class Parameters:
    pi: torch.Tensor  # [C] class priors
    theta: torch.Tensor  # [K, C, C]: theta_k[c, l] = P(k says l | true class c)
    # [K, C, C]: log theta_k[c, l] at [k, l, c] (for votes: a vote l's row of log
    # likelihoods over c, gathered whole), None with soft evidence
    log_by_vote: torch.Tensor | None = None


def by_vote(weight: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    """``out[k, c, l] = sum_i weight[i, c] [v_ik = l]`` ``[K, C, C]`` for ``weight [R, C]``
    and ``votes [K, R]``: the product with one-hot votes, without them (each row of
    ``weight`` added into the row of ``out[k]^T`` its vote names)."""
    C = weight.shape[1]
    zeros = torch.zeros(C, C, dtype=torch.float64)
    return torch.stack([zeros.clone().index_add_(0, v, weight).T for v in votes])


class DawidSkene(StreamingGenerator):
    """Label each row with its Dawid-Skene posterior; accept where its max >= ``tau``.

    The combined target is not used: the teachers' outputs are. Reports each teacher's
    estimated accuracy, the posterior probability of its vote averaged over the rows
    ``mean_i q_i(v_ik)`` (in teacher order; for votes, ``sum_c pi_c theta_k[c, c]`` but
    for the smoothing), the class priors and the number of EM iterations.
    """

    def __init__(
        self, soft: bool, max_iter: int, tol: float, smoothing: float, tau: float, init: str
    ):
        self.soft = soft
        self.teacher_probs = soft or init == "mean"  # votes are enough for the classic EM
        self.max_iter = max_iter
        self.tol = tol
        self.smoothing = smoothing
        self.tau = tau
        self.init = init
        self.info: dict = {}

    def prepare(self, shards: LabelShards) -> None:
        self.said = shards.known.unsqueeze(1).double()  # [K, 1, C]: what teacher k can say
        self.mean = self._mean_probs(shards) if self.soft else None
        q_sum, counts = 0.0, 0.0
        for rows in blocks(shards):
            q = self._initial(rows)
            q_sum, counts = q_sum + q.sum(0), counts + by_vote(q, rows.votes)
        previous, converged, iterations = None, False, 0
        with Progress("dawid-skene EM", self.max_iter, unit="iteration", every=1) as progress:
            while iterations < self.max_iter and not converged:
                iterations += 1
                params = self._m_step(q_sum / shards.rows, counts)
                q_sum, counts, change, accuracy = 0.0, 0.0, 0.0, 0.0
                for rows in blocks(shards):
                    q, likelihood, evidence = self._e_step(params, rows)
                    if previous is None:
                        before = self._initial(rows)
                    else:
                        before = self._e_step(previous, rows)[0]
                    change = max(change, float((q - before).abs().max()))
                    counts = counts + self._counts(params, q, likelihood, evidence, rows.votes)
                    q_sum = q_sum + q.sum(0)
                    accuracy = accuracy + q.gather(1, rows.votes.T).sum(0)
                previous, converged = params, change < self.tol
                progress.update(rows=shards.rows, values=lambda change=change: {"change": change})
        self.params = previous
        self.info = {
            "teacher_accuracy": (accuracy / shards.rows).tolist(),
            "class_priors": self._m_step(q_sum / shards.rows, counts).pi.tolist(),
            "iterations": iterations,
            "converged": converged,
        }

    def decide(self, rows: ShardRows) -> Labels:
        parts = [self._e_step(self.params, block)[0] for block in blocks([rows])]
        probs = torch.cat(parts).to(rows.target.dtype) if parts else rows.target.clone()
        return hard_labels(probs, probs.max(1).values >= self.tau)

    def summary(self) -> dict:
        return self.info

    def _mean_probs(self, shards: LabelShards) -> torch.Tensor:
        """Each teacher's mean probability of each label over the rows, ``[K, 1, C]``."""
        total = sum(rows.teacher_probs.double().sum(1, keepdim=True) for rows in blocks(shards))
        return (total / shards.rows).clamp_min(TINY)

    def _initial(self, rows: ShardRows) -> torch.Tensor:
        """The starting posteriors ``[R, C]``: vote shares, or the mean probabilities."""
        if self.init == "mean":
            return rows.teacher_probs.double().mean(0)
        K, R = rows.votes.shape
        share = torch.full((R, K), 1.0 / K, dtype=torch.float64)
        return torch.zeros(R, self.said.shape[2], dtype=torch.float64).scatter_add_(
            1, rows.votes.T, share
        )

    def _e_step(self, params: Parameters, rows: ShardRows):
        """Posteriors ``q [R, C]``, likelihoods ``L [K, R, C]`` and the evidence of the
        rows under ``params`` (for votes only ``q``: the rest is None)."""
        if not self.soft:  # log q = log pi + sum_k log theta_k[:, v_ik], a row gathered per vote
            score = params.pi.log().expand(rows.votes.shape[1], -1).clone()
            for log_rows, v in zip(params.log_by_vote, rows.votes):
                score += log_rows.index_select(0, v)
            return torch.softmax(score, dim=1), None, None
        probs = rows.teacher_probs.double()
        evidence = torch.where(self.said.bool(), probs / self.mean, torch.zeros_like(probs))
        evidence = evidence.float()  # the products in float32: twice float64's speed
        likelihood = torch.einsum("kcl,knl->knc", params.theta.float(), evidence).double()
        likelihood = likelihood.clamp_min(TINY)
        q = torch.softmax(params.pi.log() + likelihood.log().sum(0), dim=1)
        return q, likelihood, evidence

    def _counts(self, params: Parameters, q, likelihood, evidence, votes) -> torch.Tensor:
        """The expected counts ``[K, C, C]``: ``theta * sum_i q_i(c) / L_ik(c) e_ik(l)``;
        for votes that is ``sum_i q_i(c) [v_ik = l]``."""
        if evidence is None:
            return by_vote(q, votes)
        return params.theta * torch.einsum("knc,knl->kcl", q / likelihood, evidence.double())

    def _m_step(self, q_mean: torch.Tensor, counts: torch.Tensor) -> Parameters:
        """Priors ``[C]`` and ``theta`` ``[K, C, C]`` (0 where k cannot say l) from the mean
        posterior ``[C]`` and the expected counts ``[K, C, C]``."""
        said = self.said
        counts = (counts + self.smoothing * said) * said
        theta = counts / counts.sum(2, keepdim=True)
        log_by_vote = (
            None if self.soft else theta.clamp_min(TINY).log().transpose(1, 2).contiguous()
        )
        return Parameters(q_mean.clamp_min(1e-12), theta, log_by_vote)
