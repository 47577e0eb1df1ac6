"""Issue 18: ``teachers report`` at many classes, in one pass over the rows, and the
per-class figure panel shared by reports (``kdplug.reports.figures.per_class_panel``)."""

import numpy as np
import pytest

from kdplug.reports.figures import new_figure, per_class_panel, save_figure


def test_per_class_panel_draws_one_bar_per_class_at_5_classes(tmp_path):
    fig, ax = new_figure()
    named = per_class_panel(ax, list("abcde"), [0.1, 0.5, np.nan, 0.9, 0.3], "recall")
    assert named == {"top": [], "bottom": []}
    assert len(ax.patches) == 5
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcde")
    save_figure(fig, tmp_path / "five.png")
    assert (tmp_path / "five.png").stat().st_size > 0


def test_per_class_panel_names_exactly_the_top_and_bottom_classes_at_1000(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.permutation(1000) / 1000.0  # distinct values: the order is unambiguous
    values[[3, 7]] = np.nan  # two classes without rows
    names = [f"class-{i}" for i in range(1000)]
    fig, ax = new_figure()
    named = per_class_panel(ax, names, values, "recall", xlabel="recall")
    order = [i for i in np.argsort(values) if not np.isnan(values[i])]
    assert named["bottom"] == [(names[i], values[i]) for i in order[:10]]
    assert named["top"] == [(names[i], values[i]) for i in order[::-1][:10]]
    text = "\n".join(t.get_text() for t in ax.texts)
    for name, _ in named["top"] + named["bottom"]:
        assert name in text
    assert len(ax.get_xticklabels()) < 30  # no tick per class
    assert "2 without a value" in ax.get_title()
    assert sum(p.get_height() for p in ax.patches) == 998  # every class with a value, once
    save_figure(fig, tmp_path / "many.png")
    assert (tmp_path / "many.png").stat().st_size > 0


def test_per_class_panel_refuses_names_and_values_of_different_lengths():
    fig, ax = new_figure()
    with pytest.raises(ValueError, match="3 names for 2 values"):
        per_class_panel(ax, list("abc"), [0.1, 0.2], "recall")
