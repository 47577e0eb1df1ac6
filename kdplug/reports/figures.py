"""Saving matplotlib figures headlessly and atomically, and panels shared by reports
(``per_class_panel``: one value per class, readable at 5 or 1,000 classes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdplug.outputs import atomic_path


def new_figure(*args: Any, **kwargs: Any):
    """``plt.subplots`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


# a class axis with more classes than this is drawn as a histogram across classes
MAX_BARS = 30


def per_class_panel(
    ax: Any,
    names: Sequence[str],
    values: Sequence[float],
    title: str,
    *,
    xlabel: str = "",
    max_bars: int = MAX_BARS,
    named: int = 10,
    fmt: str = "{:.3f}",
) -> dict[str, list[tuple[str, float]]]:
    """Draw one value per class on ``ax``, readable at any class count.

    ``per_class_panel(ax, names, values, title, *, xlabel="", max_bars=30, named=10,
    fmt="{:.3f}") -> {"top": [(name, value), ...], "bottom": [...]}``

    ``names [C]`` and ``values [C]`` (NaN: no value for that class, e.g. no row of it).
    Up to ``max_bars`` classes: one bar per class, named on the x axis, and empty lists
    returned. More: a histogram of the values across classes (``xlabel`` names the value),
    with the ``named`` highest and lowest classes listed beside it in two columns (``fmt``
    formats their values) and returned, highest first in ``top``, lowest first in
    ``bottom``; ties keep the class order. Classes without a value are counted in the
    title, not drawn.
    """
    names = [str(n) for n in names]
    values = np.asarray(values, dtype=np.float64)
    if len(names) != len(values):
        raise ValueError(f"per_class_panel: {len(names)} names for {len(values)} values")
    if len(values) <= max_bars:
        ax.bar(range(len(values)), np.nan_to_num(values), color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0, fontsize=7)
        ax.set(ylabel=xlabel)
        ax.set_title(title, fontsize=9)
        return {"top": [], "bottom": []}
    has = np.flatnonzero(~np.isnan(values))
    missing = len(values) - len(has)
    ax.hist(values[has], bins=min(40, max(10, len(has) // 25)), color="tab:blue")
    ax.set(xlabel=xlabel, ylabel="classes")
    note = f"; {missing} without a value" if missing else ""
    ax.set_title(f"{title} ({len(values)} classes{note})", fontsize=9)
    top = has[np.argsort(-values[has], kind="stable")][:named].tolist()
    bottom = has[np.argsort(values[has], kind="stable")][:named].tolist()
    picked = {
        "top": [(names[i], float(values[i])) for i in top],
        "bottom": [(names[i], float(values[i])) for i in bottom],
    }
    offset = 8.0  # points right of the axes; two columns beside the histogram
    for heading, listed in (("highest", picked["top"]), ("lowest", picked["bottom"])):
        lines = [f"{heading} {len(listed)}"]
        width = max((len(short_name(n)) for n, _ in listed), default=0)
        lines += [f"{short_name(n).ljust(width)}  {fmt.format(v)}" for n, v in listed]
        ax.annotate(
            "\n".join(lines),
            (1.0, 1.0),
            xycoords="axes fraction",
            xytext=(offset, 0),
            textcoords="offset points",
            va="top",
            fontsize=7,
            family="monospace",
        )
        offset += 4.4 * max(len(line) for line in lines) + 12  # 7-pt monospace: ~4.2 pt a char
    return picked


def short_name(name: str, width: int = 24) -> str:
    """A class name cut to ``width`` characters (keeps its start) for figure text."""
    return name if len(name) <= width else name[: width - 1] + "…"
