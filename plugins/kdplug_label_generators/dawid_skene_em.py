"""Dawid-Skene (1979): EM over per-teacher confusion matrices, without ground truth.

Teacher k has ``theta_k[c, l] = P(k says l | true class c)``; classes have priors ``pi``.
Posteriors ``q [N, C]`` start from the (hard) majority vote, then alternate
M-step ``pi_c = mean_i q_i(c)``, ``theta_k[c, l] ∝ sum_i q_i(c) v_ik(l) + smoothing``
and E-step ``log q_i(c) = log pi_c + sum_k sum_l v_ik(l) log theta_k[c, l] + const``,
with ``v_ik`` teacher k's one-hot vote (or its probabilities when ``soft``).
"""

from __future__ import annotations

import torch

from kdplug.api import Labels
from kdplug_label_generators.confidence import hard_labels, votes


class DawidSkene:
    """Label each row with its Dawid-Skene posterior; accept where its max >= ``tau``.

    The combined target is not used: the teachers' votes are. Reports each teacher's
    estimated accuracy ``sum_c pi_c theta_k[c, c]`` (in teacher order), the class priors
    and the number of EM iterations.
    """

    def __init__(self, soft: bool, max_iter: int, tol: float, smoothing: float, tau: float):
        self.soft = soft
        self.max_iter = max_iter
        self.tol = tol
        self.smoothing = smoothing
        self.tau = tau

    def __call__(self, target, teacher_probs, known) -> Labels:
        K, N, C = teacher_probs.shape
        hard = torch.nn.functional.one_hot(votes(teacher_probs), C).double()
        v = teacher_probs.double() if self.soft else hard
        said = known.to(v.device).unsqueeze(1)  # [K, 1, C]: the labels teacher k can say
        q = hard.mean(0)  # the majority vote: one overconfident teacher cannot dominate it
        converged, iterations = False, 0
        while iterations < self.max_iter and not converged:
            iterations += 1
            pi, log_theta, _ = self._m_step(q, v, said)
            new_q = torch.softmax(pi.log() + torch.einsum("knl,kcl->nc", v, log_theta), dim=1)
            converged = float((new_q - q).abs().max()) < self.tol
            q = new_q
        pi, _, theta = self._m_step(q, v, said)
        accuracy = (pi.unsqueeze(0) * theta.diagonal(dim1=1, dim2=2)).sum(1)
        probs = q.to(target.dtype)
        return hard_labels(
            probs,
            probs.max(1).values >= self.tau,
            teacher_accuracy=accuracy.tolist(),
            class_priors=pi.tolist(),
            iterations=iterations,
            converged=converged,
        )

    def _m_step(self, q: torch.Tensor, v: torch.Tensor, said: torch.Tensor):
        """Priors ``[C]``, ``log theta`` ``[K, C, C]`` (0 where k cannot say l) and theta."""
        pi = q.mean(0).clamp_min(1e-12)
        counts = torch.einsum("nc,knl->kcl", q, v) + self.smoothing * said
        counts = counts * said
        theta = counts / counts.sum(2, keepdim=True)
        log_theta = torch.where(said, theta.clamp_min(1e-300).log(), torch.zeros_like(theta))
        return pi, log_theta, theta
