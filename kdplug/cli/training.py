"""The optimizer and schedule options of ``distill`` and ``self-train``: timm's
``create_optimizer_v2`` / ``create_scheduler_v2`` knobs, named as timm's train.py names them.

Each defaults to None here (not given): the engine's ``DistillConfig`` holds the defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

# (flag, type, help): the DistillConfig field is the flag's name with _ for -
TRAINING_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("--opt", str, "Optimizer, a timm.optim name: adamw, sgd, lamb, ... (default adamw)."),
    ("--weight-decay", float, "Weight decay, none on biases and norms (default 0.05)."),
    ("--momentum", float, "Momentum of the optimizers that have one, e.g. sgd (default 0.9)."),
    (
        "--sched",
        str,
        "Learning-rate schedule, stepped every update: cosine, tanh, step, multistep, poly, "
        "constant, wsd or rsqrt (default cosine).",
    ),
    ("--warmup-epochs", int, "Epochs of linear warm-up from --warmup-lr (default 0)."),
    ("--warmup-lr", float, "Learning rate at the start of warm-up (default 1e-5)."),
    ("--min-lr", float, "Lowest learning rate of the schedule (default 0)."),
    (
        "--decay-epochs",
        float,
        "step: epochs between decays; wsd/rsqrt: length of the decay (default timm's).",
    ),
    (
        "--decay-milestones",
        str,
        "multistep: the epochs of each decay, e.g. 150,180,210 (default timm's 90,180,270).",
    ),
    ("--decay-rate", float, "step, multistep: factor of each decay; poly: the power (0.1)."),
    ("--clip-grad", float, "Clip gradients to this norm (or value, --clip-mode; default off)."),
    ("--clip-mode", str, "norm, value or agc (default norm)."),
    (
        "--label-smoothing",
        float,
        "Label smoothing of the cross-entropy on labeled rows (default 0).",
    ),
)
NAMES = tuple(flag[2:].replace("-", "_") for flag, _, _ in TRAINING_OPTIONS)


def training_options(command: Callable) -> Callable:
    """Add the ``TRAINING_OPTIONS`` to a command (each parameter named as its field)."""
    for flag, kind, text in reversed(TRAINING_OPTIONS):
        command = click.option(flag, type=kind, default=None, help=text)(command)
    return command


def given_training(params: dict[str, Any]) -> dict[str, Any]:
    """Take the training options out of a command's ``params``: those given, by name."""
    values = {name: params.pop(name) for name in NAMES}
    return {name: value for name, value in values.items() if value is not None}
