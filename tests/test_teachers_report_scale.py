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


# -- teachers report at a few hundred classes --------------------------------------------------

CLASSES = 200


def many_class_data(root, rows: int, seed: int = 0):
    """A saved dataset of ``rows`` rows (one numeric column) labeled with CLASSES named
    classes, and 3 row-aligned ``logits:`` teachers right on different shares of the rows;
    returns the DATA spec, the teacher specs, the labels and the logits ``[K, N, C]``."""
    import datasets

    rng = np.random.default_rng(seed)
    truth = rng.integers(0, CLASSES, rows)
    names = [f"class-{c}" for c in range(CLASSES)]
    features = datasets.Features(
        {"x": datasets.Value("float32"), "label": datasets.ClassLabel(names=names)}
    )
    table = {"x": rng.normal(size=rows).astype(np.float32), "label": truth}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(root / "data"))
    specs, logits = [], []
    for k, accuracy in enumerate((0.3, 0.6, 0.9)):
        vote = np.where(rng.random(rows) < accuracy, truth, rng.integers(0, CLASSES, rows))
        z = rng.normal(size=(rows, CLASSES)).astype(np.float32)
        z[np.arange(rows), vote] += rng.uniform(1.0, 6.0, rows).astype(np.float32)
        np.save(root / f"t{k}.npy", z)
        specs.append(f"logits:{root / f't{k}.npy'}")
        logits.append(z)
    return f"disk:{root / 'data'}", specs, truth, np.stack(logits)


def test_teachers_report_at_200_classes_matches_numpy_and_draws_per_class_panels(
    tmp_path, monkeypatch
):
    import json

    from kdplug import fitting, metrics
    from kdplug.engines.teachers import report

    data, specs, truth, logits = many_class_data(tmp_path, rows=800)
    monkeypatch.setattr(fitting, "FIT_ROWS", 100)  # the fits and checks see a sample
    result = report(specs, data, out=str(tmp_path / "report"), batch_size=128)
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    predicted = probs.argmax(-1)  # [K, N]
    rows = np.bincount(truth, minlength=CLASSES)
    assert result["rows"] == 800 and result["fit_rows"] == 100
    assert result["class_rows"] == rows.tolist()
    for k, teacher in enumerate(result["teachers"]):
        hits = np.bincount(truth[predicted[k] == truth], minlength=CLASSES)
        expected = [h / n if n else None for h, n in zip(hits, rows)]
        assert teacher["class_accuracy"] == pytest.approx(expected, abs=1e-12)
        assert teacher["accuracy"] == pytest.approx(metrics.accuracy(probs[k], truth), abs=1e-12)
        assert teacher["nll"] == pytest.approx(metrics.nll(probs[k], truth), rel=1e-5)
        assert teacher["ece"] == pytest.approx(metrics.ece(probs[k], truth), abs=1e-6)
        table = metrics.reliability(probs[k], truth)
        assert teacher["reliability"]["count"] == table["count"]
    agreement = metrics.agreement_matrix(predicted)
    assert np.allclose(result["agreement"], agreement, atol=1e-12)
    mean = next(c for c in result["combiners"] if c["name"] == "mean")
    assert mean["rows"] == 800 and not mean["held_out"]
    assert mean["accuracy"] == pytest.approx(metrics.accuracy(probs.mean(0), truth), abs=1e-12)
    auto = next(c for c in result["combiners"] if c["name"] == "auto")
    assert auto["rows"] == 100 and auto["held_out"]
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["teachers"][2]["class_accuracy"] == result["teachers"][2]["class_accuracy"]
    assert (tmp_path / "report" / "per_class.png").stat().st_size > 0


def test_per_class_figure_names_each_teachers_best_and_worst_classes(tmp_path):
    from kdplug.reports.teachers import per_class_figure

    accuracy = np.linspace(0.0, 1.0, CLASSES)
    classes = [f"class-{c}" for c in range(CLASSES)]
    result = {
        "classes": classes,
        "teachers": [{"name": "a", "spec": "logits:a.npy", "class_accuracy": accuracy.tolist()}],
    }
    fig = per_class_figure(result)
    text = "\n".join(t.get_text() for t in fig.axes[0].texts)
    assert "class-199" in text and "class-190" in text and "class-0" in text
    assert "class-100" not in text
