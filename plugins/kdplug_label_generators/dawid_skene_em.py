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
"""

from __future__ import annotations

import torch

from kdplug.api import Labels
from kdplug_label_generators.confidence import hard_labels, votes

INITS = ("vote", "mean")
TINY = 1e-300


class DawidSkene:
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
        self.max_iter = max_iter
        self.tol = tol
        self.smoothing = smoothing
        self.tau = tau
        self.init = init

    def __call__(self, target, teacher_probs, known) -> Labels:
        K, N, C = teacher_probs.shape
        probs = teacher_probs.double()
        hard = torch.nn.functional.one_hot(votes(teacher_probs), C).double()
        said = known.to(probs.device).unsqueeze(1)  # [K, 1, C]: the labels teacher k can say
        evidence = self._evidence(probs, said) if self.soft else hard
        q = hard.mean(0) if self.init == "vote" else probs.mean(0)
        counts = torch.einsum("nc,knl->kcl", q, hard)  # the votes' counts under q
        converged, iterations = False, 0
        while iterations < self.max_iter and not converged:
            iterations += 1
            pi, theta = self._m_step(q, counts, said)
            likelihood = torch.einsum("kcl,knl->knc", theta, evidence).clamp_min(TINY)
            new_q = torch.softmax(pi.log() + likelihood.log().sum(0), dim=1)
            counts = theta * torch.einsum("knc,knl->kcl", new_q / likelihood, evidence)
            converged = float((new_q - q).abs().max()) < self.tol
            q = new_q
        pi, _ = self._m_step(q, counts, said)
        accuracy = (q.unsqueeze(0) * hard).sum(2).mean(1)
        probs_out = q.to(target.dtype)
        return hard_labels(
            probs_out,
            probs_out.max(1).values >= self.tau,
            teacher_accuracy=accuracy.tolist(),
            class_priors=pi.tolist(),
            iterations=iterations,
            converged=converged,
        )

    @staticmethod
    def _evidence(probs: torch.Tensor, said: torch.Tensor) -> torch.Tensor:
        """``p_ik(l) / mean_j p_jk(l)`` ``[K, N, C]``, 0 where teacher k cannot say ``l``."""
        mean = probs.mean(1, keepdim=True).clamp_min(TINY)
        return torch.where(said, probs / mean, torch.zeros_like(probs))

    def _m_step(self, q: torch.Tensor, counts: torch.Tensor, said: torch.Tensor):
        """Priors ``[C]`` and ``theta`` ``[K, C, C]`` (0 where k cannot say l) from the
        posteriors ``q [N, C]`` and the expected counts ``[K, C, C]``."""
        pi = q.mean(0).clamp_min(1e-12)
        counts = (counts + self.smoothing * said) * said
        return pi, counts / counts.sum(2, keepdim=True)
