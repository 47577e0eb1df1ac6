"""Tabular students: a torch MLP for feature rows (``csv:``, ``parquet:``, ``sklearn:``).

- student ``tabular:mlp``: ``[B, D]`` feature rows -> logits ``[B, C]``; its feature
  normalization (each feature's mean and std) is fitted on the ``--train`` rows and saved
  with its weights, so the student directory needs nothing but torch to run.

Options and defaults live only in this factory; kdplug_tabular.mlp does the work.
"""

from __future__ import annotations

from typing import Literal

import kdplug

__version__ = kdplug.__version__


def tabular_student(
    ref: str,
    num_classes: int,
    in_chans: int,
    widths: list[int] = (256, 128),  # type: ignore[assignment]  # a tuple: no shared list
    dropout: float = 0.1,
    activation: Literal["relu", "gelu", "silu"] = "relu",
):
    """An MLP on feature rows (REF mlp): widths=256;128 hidden layers, dropout=0.1,
    activation=relu|gelu|silu; in_chans is the feature count."""
    from kdplug_tabular.mlp import build_mlp

    return build_mlp(ref, num_classes, in_chans, list(widths), dropout, activation)


@kdplug.hookimpl
def register_students(register):
    register("tabular", tabular_student)
