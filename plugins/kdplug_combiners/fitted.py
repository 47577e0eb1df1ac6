"""``auto``: a combiner fitted on labeled rows: calibrate each teacher, weigh, pool.

``fit(logits [K, N, C], known [K, C], labels [N])`` (1) fits one temperature per teacher
(``kdplug.api.fit_temperature``), (2) fits teacher weights on the simplex
(``softmax`` of free parameters, optionally per class) minimizing the NLL of the pooled
prediction plus a pull toward equal weights, for the linear pool (mixture of
probabilities) and the log pool (weighted geometric
mean), and keeps the pool with the lower k-fold cross-validated NLL, (3) keeps the best
single teacher instead if the pooled prediction is less accurate on the labeled rows.

The fit then serves two uses. ``predict`` gives the **prediction**: the calibrated
teachers pooled, what ``label`` writes and reports score. Calling it gives the
**distillation target** at the loss's temperature ``T``: each teacher's own logits
divided by ``T`` (``softmax(z_k / T)``, as every combiner tempers them), pooled with the
fitted weights. Calibration decides how much each teacher counts, not what the student
learns from: a temperature below 1 would sharpen an under-confident teacher (a forest's
vote fractions) and erase the non-target probabilities distillation transfers
(docs/benchmarks.md measures both). (4) If that pool of the teachers' own outputs is less
accurate on the labeled rows than the best single teacher (when their confidence scales
differ so much that a sharp weak teacher outvotes a flat good one), the target pools the
calibrated teachers instead.

Until it is fitted (a fit on no labeled rows: the engines give it none where the teachers
look trained on the rows, ``kdplug.fitting.check_fit_rows``) ``auto`` combines like
``mean`` and says so in its record (``UNFITTED``).

Exact zeros (a probability teacher's ``log p`` at ``IMPOSSIBLE``, classes a teacher
does not know) are carried as ``-inf``: no temperature or weight gives them mass. In the
log pool a class that a weighted teacher gives probability 0 gets 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from kdplug.api import (
    IMPOSSIBLE,
    UsageError,
    accuracy,
    apply_temperature,
    fit_temperature,
    fixed_sample,
    masked_log_softmax,
    nll,
    normalize_weights,
    one_thread,
    split_folds,
)
from kdplug_combiners.equal import Mean

log = logging.getLogger("kdplug")

POOLS = ("linear", "log")
MIN_ROWS = 1_000  # fit_values never leaves a fit fewer rows than this
# what auto does until it is fitted (no labeled rows, or rows kdplug does not fit on)
UNFITTED = "like `mean`: equal weights on the teachers' own probabilities"


def tempered_log_probs(
    logits: torch.Tensor, known: torch.Tensor, temperatures: torch.Tensor
) -> torch.Tensor:
    """Each teacher's log-probabilities ``[K, N, C]`` at its temperature ``[K]``, ``-inf``
    where it cannot predict a class or gives it probability exactly 0."""
    z = apply_temperature(logits, temperatures.to(logits).view(-1, 1, 1))
    log_p = masked_log_softmax(z, known)
    zero = (z <= IMPOSSIBLE) | ~known.unsqueeze(1)
    # a row where a teacher gives all its known classes probability 0 stays uniform over them
    has_mass = (~zero).any(-1, keepdim=True)
    return log_p.masked_fill(zero & has_mass | ~known.unsqueeze(1), -math.inf)


def class_weights(weights: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Weights ``[K, C]`` renormalized per class over the teachers that know it (0 for a
    class no teacher knows)."""
    per_class = weights * known.to(weights.dtype)
    total = per_class.sum(0, keepdim=True)
    return torch.where(total > 0, per_class / total.clamp_min(1e-300), torch.zeros_like(total))


def pool_log_probs(
    log_p: torch.Tensor, weights: torch.Tensor, known: torch.Tensor, pool: str
) -> torch.Tensor:
    """Pooled log-probabilities ``[N, C]`` of calibrated ``log_p [K, N, C]`` under
    per-class weights ``[K, C]``; ``-inf`` marks exact zeros.

    linear: ``p(c) ∝ Σ_k w_kc p_k(c)``. log: ``p(c) ∝ exp(Σ_k w_kc log p_k(c))``, 0 where a
    weighted teacher gives 0; a row where that leaves no class falls back to the linear pool.
    """
    w = class_weights(weights, known).unsqueeze(1)  # [K, 1, C]
    linear = torch.log((w * log_p.exp()).sum(0))
    linear = linear - torch.logsumexp(linear, -1, keepdim=True)
    if pool == "linear":
        return linear
    score = torch.where(w > 0, w * log_p, torch.zeros_like(log_p)).sum(0)
    score = score.masked_fill(~known.any(0), -math.inf)
    pooled = torch.log_softmax(score, -1)
    empty = torch.isinf(score).all(-1, keepdim=True)
    return torch.where(empty, linear, pooled)


class PoolNLL:
    """The mean NLL of the labeled rows under the pool of calibrated ``log_p [K, N, C]``
    as a function of the weights ``[K, C]`` (``class_weights``), the objective of
    ``fit_weights``; what does not depend on the weights is computed once.

    linear: ``-log sum_k w_ky p_ky + log sum_c sum_k w_kc p_kc``; the normalizer needs each
    teacher's probability summed over the classes that share their weights (one group per
    pattern of teachers that know a class, or per class with ``per_class``), ``[K, N, G]``.
    log: ``log sum_c exp(sum_k w_kc log p_kc) - sum_k w_ky log p_ky``, with ``log p``
    floored at ``IMPOSSIBLE`` so gradients exist everywhere and a class no teacher knows
    held at ``IMPOSSIBLE``.
    """

    def __init__(
        self,
        log_p: torch.Tensor,
        known: torch.Tensor,
        labels: torch.Tensor,
        pool: str,
        per_class: bool,
    ):
        K, N, C = log_p.shape
        self.pool, self.labels = pool, labels
        label_log_p = log_p.gather(2, labels.view(1, N, 1).expand(K, N, 1)).squeeze(2)
        if pool == "linear":
            self.label_p = label_log_p.exp()  # [K, N]
            if per_class:
                self.member, self.sums = torch.arange(C), log_p.exp()
            else:
                _, group = torch.unique(known.T, dim=0, return_inverse=True)
                groups = int(group.max()) + 1
                # one class of each group (any: the weights are the same across a group)
                self.member = torch.zeros(groups, dtype=torch.long).scatter_(
                    0, group, torch.arange(C)
                )
                self.sums = log_p.new_zeros(K, N, groups)
                for k in range(K):
                    self.sums[k].index_add_(1, group, log_p[k].exp())
        else:
            self.floored = log_p.clamp_min(IMPOSSIBLE)
            self.label_log_p = label_log_p.clamp_min(IMPOSSIBLE)
            self.unknown = torch.where(known.any(0), 0.0, IMPOSSIBLE).to(log_p.dtype)

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        label_weights = weights[:, self.labels]  # [K, N]
        if self.pool == "linear":
            label_mass = (label_weights * self.label_p).sum(0).clamp_min(1e-300)
            total = torch.einsum("kng,kg->n", self.sums, weights[:, self.member])
            return (total.log() - label_mass.log()).mean()
        score = self.unknown + sum(w * floored for w, floored in zip(weights, self.floored))
        label_score = (label_weights * self.label_log_p).sum(0)
        return (torch.logsumexp(score, 1) - label_score).mean()


def fit_weights(
    log_p: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
    pool: str,
    per_class: bool,
    reg: float,
) -> torch.Tensor:
    """Weights ``[K, C]`` minimizing the NLL of the pooled calibrated ``log_p [K, N, C]``
    (``PoolNLL``) plus ``reg / N * (|θ|² + |φ|²)``, with ``w = softmax_k(θ_k + φ_kc)``
    (``φ = 0`` unless ``per_class``); ``θ = φ = 0`` is equal weights. LBFGS in float64."""
    K, N, C = log_p.shape
    mean_nll = PoolNLL(log_p.double(), known, labels, pool, per_class)
    theta = torch.zeros(K, 1, dtype=torch.float64, requires_grad=True)
    phi = torch.zeros(K, C, dtype=torch.float64, requires_grad=per_class)
    params = [theta, phi] if per_class else [theta]
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        weights = class_weights(torch.softmax(theta + phi, 0), known)
        loss = mean_nll(weights) + reg / N * (theta.square().sum() + phi.square().sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return torch.softmax(theta + phi, 0).detach()


@dataclass
class Fitted:
    """What ``fit`` learned: each teacher's temperature ``[K]``, weights ``[K, C]``, the
    pool, and whether the distillation target uses the calibrated teachers too."""

    temperatures: torch.Tensor
    weights: torch.Tensor
    pool: str  # "linear", "log" or "single" (all weight on one teacher)
    calibrated_target: bool = False
    single: int | None = None  # the one teacher of the "single" pool (set from weights)

    def __post_init__(self) -> None:
        if self.pool == "single" and self.single is None:
            self.single = int(self.weights[:, 0].argmax())

    def to(self, device: torch.device) -> Fitted:
        """The same fit with its tensors on ``device`` (moved once, not per batch)."""
        moved = {"temperatures": self.temperatures.to(device), "weights": self.weights.to(device)}
        return dataclasses.replace(self, **moved)

    def log_prediction(self, logits: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """The prediction's log-probabilities ``[N, C]`` for ``logits [K, N, C]``: each
        teacher at its calibrated temperature, pooled."""
        return self._pool(logits, known, self.temperatures)

    def log_target(
        self, logits: torch.Tensor, known: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """The distillation target's log-probabilities ``[N, C]``: each teacher's logits
        divided by ``temperature`` (and by its calibrated temperature only where
        ``calibrated_target``), pooled with the fitted weights."""
        base = self.temperatures if self.calibrated_target else torch.ones_like(self.temperatures)
        return self._pool(logits, known, base * temperature)

    def _pool(
        self, logits: torch.Tensor, known: torch.Tensor, temperatures: torch.Tensor
    ) -> torch.Tensor:
        log_p = tempered_log_probs(logits, known, temperatures)
        if self.single is not None:
            return log_p[self.single]
        return pool_log_probs(log_p, self.weights.to(log_p.dtype), known, self.pool)


def vetoes(log_p: torch.Tensor, known: torch.Tensor) -> bool:
    """Whether a teacher gives probability exactly 0 to a class it knows where another
    teacher gives it mass (``log_p [K, N, C]``): the log pool would remove that class from
    the target, so ``pool=cv`` then keeps the linear pool."""
    zero = torch.isinf(log_p) & known.unsqueeze(1)
    return bool((zero.any(0) & torch.isfinite(log_p).any(0)).any())


def choose_pool(losses: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """The linear pool unless the log pool's mean held-out NLL is lower by more than one
    standard error of the per-row difference (the one-standard-error rule: the log pool
    vetoes every class one teacher rules out, so it has to earn its place)."""
    linear, log_pool = losses["linear"], losses["log"]
    scores = {"linear": float(linear.mean()), "log": float(log_pool.mean())}
    difference = linear - log_pool
    finite = bool(torch.isfinite(difference).all()) and len(difference) > 1
    se = float(difference.std() / math.sqrt(len(difference))) if finite else math.inf
    chosen = "log" if finite and scores["log"] < scores["linear"] - se else "linear"
    return chosen, {"cv_nll": {p: _json_number(v) for p, v in scores.items()}, "cv_se": se}


class Auto:
    """Calibrated, fitted combination of the teachers; ``mean`` until it is fitted."""

    def __init__(self, per_class: bool, pool: str, folds: int, reg: float, fit_values: int):
        if pool not in ("cv", *POOLS):
            raise UsageError(f"auto: pool must be cv, linear or log, got {pool!r}")
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise UsageError(f"auto: folds must be an integer >= 2, got {folds}")
        if not math.isfinite(reg) or reg < 0:
            raise UsageError(f"auto: reg must be >= 0, got {reg}")
        if isinstance(fit_values, bool) or not isinstance(fit_values, int) or fit_values < 1:
            raise UsageError(f"auto: fit_values must be an integer >= 1, got {fit_values}")
        self.per_class = bool(per_class)
        self.pool = pool
        self.folds = folds
        self.reg = float(reg)
        self.fit_values = fit_values
        self.fitted: Fitted | None = None
        self.fallback = Mean()
        self.warned = False  # said that it is not fitted (fit on no rows says it in its record)

    # -- fitting -------------------------------------------------------------------------

    def fit(self, logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor) -> dict:
        """Fit on the labeled rows of ``logits [K, N, C]`` (labels ``[N]``, -1 ignored);
        return the fitted parameters and the cross-validation scores (JSON-ready). With no
        labeled row it stays unfitted and says in the record what it does then (the caller
        tells the user: ``kdplug.fitting``)."""
        with one_thread():
            return self._fit(logits, known, labels)

    def _fit(self, logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor) -> dict:
        rows = torch.nonzero(labels >= 0).squeeze(1)
        known = known.bool()
        if len(rows) == 0:
            self.fitted, self.warned = None, True
            return {"fitted": False, "rows": 0, "fallback": UNFITTED}
        rows, sample = self._sample(rows, logits.shape[2])
        logits, labels = logits[:, rows].double(), labels[rows].long()
        K, N, C = logits.shape
        temperatures = self._temperatures(logits, known, labels)
        log_p = tempered_log_probs(logits, known, temperatures)
        veto = self.pool == "cv" and vetoes(log_p, known)
        choosing = self.pool == "cv" and not veto
        losses = self._cross_validate(logits, known, labels) if choosing else {}
        pool, cv = choose_pool(losses) if losses else (self._forced_pool(), {})
        weights = fit_weights(log_p, known, labels, pool, self.per_class, self.reg)
        fitted = Fitted(temperatures, weights, pool)
        pooled = fitted.log_prediction(logits, known)
        scores = {"ensemble": accuracy(pooled, labels)}
        singles = [accuracy(log_p[k], labels) for k in range(K)]
        best = max(range(K), key=lambda k: singles[k])
        scores.update(best_teacher=singles[best], best_teacher_index=best, teachers=singles)
        guarded = scores["ensemble"] < singles[best]
        if guarded:
            weights = torch.zeros_like(weights)
            weights[best] = 1.0
            fitted = Fitted(temperatures, weights, "single")
            pooled = fitted.log_prediction(logits, known)
        scores["target"] = accuracy(fitted.log_target(logits, known, 1.0), labels)
        calibrated_target = scores["target"] < singles[best]
        self.fitted = Fitted(temperatures.float(), weights.float(), fitted.pool, calibrated_target)
        return {
            "fitted": True,
            "rows": N,
            "sample": sample,
            "pool": fitted.pool,
            "pool_choice": "cv" if cv else "linear: exact zeros (no log pool)" if veto else "given",
            "cv_nll": cv.get("cv_nll", {}),
            "cv_se": _json_number(cv["cv_se"]) if cv else None,
            "folds": min(self.folds, N) if cv else None,
            "per_class": self.per_class,
            "temperatures": [round(float(t), 4) for t in temperatures],
            "weights": self._weights_record(weights, known),
            "nll": _json_number(nll(pooled.exp(), labels)),
            "accuracy": scores,
            "guard": (
                f"the pooled prediction was less accurate than teacher {best} on the labeled "
                "rows; all weight on that teacher"
                if guarded
                else None
            ),
            "distillation_target": (
                f"calibrated teachers: their own outputs pooled were less accurate than "
                f"teacher {best} on the labeled rows"
                if calibrated_target
                else "the teachers' own outputs"
            ),
        }

    def _sample(self, rows: torch.Tensor, classes: int) -> tuple[torch.Tensor, str | None]:
        """The labeled ``rows`` to fit on: all of them up to ``fit_values`` values per
        teacher (rows x classes, at least ``MIN_ROWS`` rows), else a fixed random choice of
        that many; and what the record says of it (None for all)."""
        keep = max(self.fit_values // max(classes, 1), MIN_ROWS)
        if len(rows) <= keep:
            return rows, None
        limit = f"fit_values={self.fit_values} at {classes} classes"
        return rows[fixed_sample(len(rows), keep)], f"a random {keep} of {len(rows)} rows ({limit})"

    def _forced_pool(self) -> str:
        return "linear" if self.pool == "cv" else self.pool

    @staticmethod
    def _temperatures(logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor):
        """One temperature per teacher; 1 for a teacher that cannot predict any label."""
        values = []
        for k in range(logits.shape[0]):
            try:
                values.append(fit_temperature(logits[k], labels, known[k]))
            except UsageError:
                values.append(1.0)
        return torch.tensor(values, dtype=torch.float64)

    def _cross_validate(
        self, logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Each pool's held-out NLL of every labeled row ``[N]`` over k folds (temperatures
        and weights refitted on the other folds); {} for a split too small to hold out."""
        N = len(labels)
        if N < 2:
            return {}
        losses = {pool: torch.zeros(N, dtype=torch.float64) for pool in POOLS}
        for held in split_folds(N, min(self.folds, N)):
            train = torch.ones(N, dtype=torch.bool)
            train[held] = False
            fit_logits, fit_labels = logits[:, train], labels[train]
            temperatures = self._temperatures(fit_logits, known, fit_labels)
            log_p = tempered_log_probs(fit_logits, known, temperatures)
            for pool in POOLS:
                weights = fit_weights(log_p, known, fit_labels, pool, self.per_class, self.reg)
                pooled = Fitted(temperatures, weights, pool).log_prediction(logits[:, held], known)
                losses[pool][held] = -pooled[torch.arange(len(held)), labels[held]].double()
        return losses

    def _weights_record(self, weights: torch.Tensor, known: torch.Tensor) -> Any:
        per_class = class_weights(weights, known)
        if self.per_class:
            return [[round(float(w), 4) for w in row] for row in per_class]
        return [round(float(w), 4) for w in weights[:, 0]]

    # -- combining -----------------------------------------------------------------------

    def __call__(
        self,
        logits: torch.Tensor,
        known: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[K, B, C]``, known ``[K, C]``, labels ``[B]`` (unused) -> weights
        ``[K, B]`` (each teacher's weight averaged under the prediction) and the
        distillation target at ``temperature``, ``[B, C]``."""
        return self._combine(logits, known, labels, float(temperature))

    def predict(
        self, logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``[K, B]`` as when called, and the prediction ``[B, C]`` (the calibrated
        teachers pooled)."""
        return self._combine(logits, known, labels, None)

    def _combine(
        self,
        logits: torch.Tensor,
        known: torch.Tensor,
        labels: torch.Tensor,
        temperature: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row weights and the target at ``temperature``, or the prediction for None."""
        if self.fitted is None:
            if not self.warned:
                log.warning("auto: not fitted on labeled rows; it combines %s", UNFITTED)
                self.warned = True
            return self.fallback(logits, known, labels, 1.0 if temperature is None else temperature)
        if self.fitted.weights.device != logits.device:
            self.fitted = self.fitted.to(logits.device)
        fitted, known = self.fitted, known.bool()
        K = logits.shape[0]
        if fitted.weights.shape[0] != K:
            raise UsageError(f"auto: fitted on {fitted.weights.shape[0]} teachers, called with {K}")
        prediction = fitted.log_prediction(logits.float(), known).exp()
        weights = class_weights(fitted.weights, known)
        row_weights = normalize_weights(torch.einsum("kc,bc->kb", weights, prediction), dim=0)
        if temperature is None:
            return row_weights, prediction
        return row_weights, fitted.log_target(logits.float(), known, temperature).exp()

    def __repr__(self) -> str:
        return (
            f"auto(per_class={self.per_class}, pool={self.pool}, folds={self.folds}, "
            f"reg={self.reg}, fit_values={self.fit_values})"
        )


def _json_number(value: float) -> float | None:
    """A finite float rounded for reports; None for inf/NaN (a held-out label got p = 0)."""
    return round(float(value), 6) if math.isfinite(value) else None
