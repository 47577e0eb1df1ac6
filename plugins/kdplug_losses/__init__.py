"""Loss strategies: ``ce``, ``kd`` (Hinton), ``dkd`` (decoupled KD), ``dist`` (DIST); and
losses that add a term to one of those (their ``base``): ``fixmatch`` and ``flexmatch``
(consistency on unlabeled rows, as USB), ``fitnet`` and ``reviewkd`` (feature
distillation, as mdistiller).

The engine's total loss on a batch is ``ce_weight * CE(labeled rows) + kd_weight * loss``
(plus the added term); each loss below is the distillation part. Options and defaults
live only in these factories; the implementations (which import torch) validate them.
``kd`` and ``dkd`` accept ``T=auto`` (chosen on labeled rows by the loss's ``fit``). See
docs/losses.md.
"""

from __future__ import annotations

import kdplug

__version__ = kdplug.__version__


def ce(ce_weight: float = 1.0):
    """Cross-entropy on the labeled rows only; no teachers are run."""
    from kdplug_losses.labels_only import LabelsOnly

    return LabelsOnly(ce_weight=ce_weight)


def kd(
    T: float | str = 2.0, standardize: bool = False, ce_weight: float = 0.1, kd_weight: float = 0.9
):
    """Hinton KD: T^2 * KL(target || softmax(student / T)) on every row; T=auto fits T."""
    from kdplug_losses.hinton import KD

    return KD(T=T, standardize=standardize, ce_weight=ce_weight, kd_weight=kd_weight)


def dkd(
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float | str = 2.0,
    warmup: int = 20,
    standardize: bool = False,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
):
    """Decoupled KD: T^2 * (alpha * TCKD + beta * NCKD), warm-up over `warmup` epochs; T=auto."""
    from kdplug_losses.decoupled import DKD

    return DKD(
        alpha=alpha,
        beta=beta,
        T=T,
        warmup=warmup,
        standardize=standardize,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
    )


def dist(
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
):
    """DIST: tau^2 * (beta * inter + gamma * intra), 1 - Pearson correlation terms."""
    from kdplug_losses.pearson import DIST

    return DIST(beta=beta, gamma=gamma, tau=tau, ce_weight=ce_weight, kd_weight=kd_weight)


def fitnet(
    base: str = "ce",
    stage: int = -2,
    weight: float = 100.0,
    teacher: str | None = None,
    **base_options,
):
    """FitNets: weight * MSE(regressor(student stage), teacher stage) added to a base loss."""
    from kdplug_losses.feature_kd import FitNet

    return FitNet(base=base, stage=stage, weight=weight, teacher=teacher, base_options=base_options)


def reviewkd(
    base: str = "ce",
    stages: int = 3,
    weight: float = 1.0,
    warmup: int = 20,
    max_mid_channel: int = 512,
    teacher: str | None = None,
    **base_options,
):
    """ReviewKD: fused student stages against the teacher's last stages, added to a base loss."""
    from kdplug_losses.feature_kd import ReviewKD

    return ReviewKD(
        base=base,
        stages=stages,
        weight=weight,
        warmup=warmup,
        max_mid_channel=max_mid_channel,
        teacher=teacher,
        base_options=base_options,
    )


def fixmatch(
    base: str = "ce",
    threshold: float = 0.95,
    lambda_u: float = 1.0,
    mu: float = 7.0,
    strong: str = "rand-m10-n2-mstd0.5",
    source: str = "auto",
    **base_options,
):
    """FixMatch consistency on unlabeled rows (weak view's confident class as the strong
    view's target; confident teachers' class first with source=auto) added to a base loss."""
    from kdplug_losses.consistency import FixMatch

    return FixMatch(
        base=base,
        threshold=threshold,
        lambda_u=lambda_u,
        mu=mu,
        strong=strong,
        source=source,
        base_options=base_options,
    )


def flexmatch(
    base: str = "ce",
    threshold: float = 0.95,
    lambda_u: float = 1.0,
    mu: float = 7.0,
    strong: str = "rand-m10-n2-mstd0.5",
    source: str = "auto",
    warmup: bool = True,
    **base_options,
):
    """fixmatch with FlexMatch's class-adaptive thresholds (warmup: USB's thresh_warmup)."""
    from kdplug_losses.consistency import FlexMatch

    return FlexMatch(
        base=base,
        threshold=threshold,
        lambda_u=lambda_u,
        mu=mu,
        strong=strong,
        source=source,
        warmup=warmup,
        base_options=base_options,
    )


@kdplug.hookimpl
def register_losses(register):
    register("ce", ce)
    register("kd", kd)
    register("dkd", dkd)
    register("dist", dist)
    register("fitnet", fitnet)
    register("reviewkd", reviewkd)
    register("fixmatch", fixmatch)
    register("flexmatch", flexmatch)
