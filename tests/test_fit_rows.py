"""On which rows `auto` and `T=auto` are fitted: not on rows the teachers were trained on
(they look near-perfect there), and on `--calibration-data` where it is given."""

import json
import logging

import datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdplug import UsageError
from kdplug.cli import build_cli
from kdplug.engines.distill import DistillConfig, distill
from kdplug.engines.label import LabelConfig, run_label
from kdplug.fitting import check_fit_rows

STUDENT = "timm:test_resnet"
SEEN = "the teachers look trained on the 150 labeled --train rows"


@pytest.fixture(scope="module")
def overfit_teachers(digits_splits, tmp_path_factory):
    """Two logistic regressions trained on the 150 labeled rows, right on every one of them."""
    import skops.io
    from sklearn.linear_model import LogisticRegression

    from kdplug.data import load_data

    root = tmp_path_factory.mktemp("overfit")
    x, y, _ = load_data(digits_splits["labeled"]).batch(list(range(150)))
    rows, labels = x.flatten(1).numpy(), y.numpy()
    specs = []
    for strength in (10.0, 100.0):
        model = LogisticRegression(C=strength, max_iter=2000).fit(rows, labels)
        assert model.score(rows, labels) == 1.0
        skops.io.dump(model, root / f"logreg-{strength:g}.skops")
        specs.append(f"sklearn:{root / f'logreg-{strength:g}.skops'}")
    return specs


def distill_config(digits_splits, teachers, out, **options) -> DistillConfig:
    return DistillConfig(
        student=STUDENT,
        train=digits_splits["labeled"],
        teachers=teachers,
        out=str(out),
        epochs=1,
        batch_size=50,
        **options,
    )


def test_distill_does_not_fit_auto_on_the_teachers_training_rows(
    digits_splits, overfit_teachers, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="kdplug"):
        summary = distill(distill_config(digits_splits, overfit_teachers, tmp_path / "run"))
    fitted = summary["fitted"]
    assert fitted["fit_rows"]["near_perfect"] and fitted["fit_rows"]["rows"] == 150
    assert fitted["fit_rows"]["teacher_accuracy"] == [1.0, 1.0]
    assert fitted["combiner"]["fitted"] is False and SEEN in fitted["combiner"]["reason"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        f"{SEEN} (every teacher is at least 0.99 accurate there; teacher accuracy 1.000, 1.000)"
        ": a fit there would not carry to other rows, so combiner 'auto' is not fitted; it "
        "combines like `mean`: equal weights on the teachers' own probabilities"
    )
    assert "with --calibration-data" in warnings[0]


def test_T_auto_on_the_teachers_training_rows_is_refused(digits_splits, overfit_teachers, tmp_path):
    out = tmp_path / "run"
    config = distill_config(digits_splits, overfit_teachers, out, loss="kd,T=auto")
    with pytest.raises(UsageError, match=f"loss 'kd,T=auto' is fitted on .*{SEEN}.*a number"):
        distill(config)
    assert not out.exists()


def test_distill_fits_on_calibration_data_the_teachers_did_not_see(
    digits_splits, overfit_teachers, tmp_path
):
    out = tmp_path / "run"
    args = ["distill", "--student", STUDENT, "--train", digits_splits["labeled"]]
    args += ["--teacher", overfit_teachers[0], "--teacher", overfit_teachers[1]]
    args += ["--calibration-data", digits_splits["unlabeled"], "--loss", "kd,T=auto"]
    args += ["--epochs", "1", "--batch-size", "50", "--out", str(out)]
    result = CliRunner().invoke(build_cli(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    fit_rows = summary["fitted"]["fit_rows"]
    assert fit_rows["source"] == "labeled --calibration-data rows" and fit_rows["rows"] == 1200
    assert not fit_rows["near_perfect"] and max(fit_rows["teacher_accuracy"]) < 0.99
    assert summary["fitted"]["combiner"]["fitted"] is True
    assert summary["fitted"]["combiner"]["rows"] == 1200
    assert summary["fitted"]["loss"]["rows"] == 1200
    assert summary["data"]["calibration_data"]["labeled_rows"] == 1200
    assert summary["config"]["calibration_data"] == digits_splits["unlabeled"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "ce"}, "loss ce uses labels only: --calibration-data rows would be unused"),
        ({"store": "/nowhere", "teachers": []}, "--calibration-data needs the live teachers"),
    ],
)
def test_calibration_data_that_cannot_be_used_is_refused(
    digits_splits, overfit_teachers, tmp_path, options, message
):
    config = {"teachers": overfit_teachers, **options}
    teachers = config.pop("teachers")
    with pytest.raises(UsageError, match=message):
        distill(
            distill_config(
                digits_splits,
                teachers,
                tmp_path / "run",
                calibration_data=digits_splits["unlabeled"],
                **config,
            )
        )


def test_label_with_calibration_rows_the_teachers_saw_labels_like_mean(
    digits_splits, overfit_teachers, tmp_path
):
    def label(out, **options):
        config = LabelConfig(
            teachers=overfit_teachers,
            data=digits_splits["test"],
            out=str(tmp_path / out),
            progress=False,
            **options,
        )
        return run_label(config), datasets.load_from_disk(str(tmp_path / out))

    report, labels = label("auto", calibration_data=digits_splits["labeled"])
    assert report["combiner"] == "auto"
    assert report["fitted"]["fit_rows"]["near_perfect"]
    assert report["fitted"]["combiner"]["fitted"] is False
    _, mean = label("mean", combiner="mean")
    np.testing.assert_allclose(np.array(labels["probs"]), np.array(mean["probs"]))


def test_label_auto_without_calibration_data_says_in_words_what_it_does(
    digits_splits, overfit_teachers, tmp_path, caplog
):
    config = LabelConfig(
        teachers=overfit_teachers,
        data=digits_splits["test"],
        out=str(tmp_path / "l"),
        combiner="auto",
        progress=False,
    )
    with caplog.at_level(logging.INFO, logger="kdplug"):
        report = run_label(config)
    assert (
        "combiner 'auto' is not fitted: no labeled --calibration-data rows; it combines like "
        "`mean`: equal weights on the teachers' own probabilities" in caplog.text
    )
    assert "fitted=False" not in caplog.text and "fallback=" not in caplog.text
    assert report["fitted"] == {
        "combiner": {
            "fitted": False,
            "rows": 0,
            "fallback": "like `mean`: equal weights on the teachers' own probabilities",
            "reason": "no labeled --calibration-data rows",
        }
    }


def teachers_on(labels: torch.Tensor, accuracies: list[float], seed: int) -> torch.Tensor:
    """``[K, N, 5]`` logits: teacher k puts a margin of 8 on the label on a fraction
    ``accuracies[k]`` of the rows, on the next class elsewhere."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(accuracies), len(labels), 5, generator=g)
    for k, accuracy in enumerate(accuracies):
        right = torch.rand(len(labels), generator=g) < accuracy
        said = torch.where(right, labels, (labels + 1) % 5)
        logits[k, torch.arange(len(labels)), said] += 8
    return logits


@pytest.mark.parametrize(
    "accuracies, why",
    [
        ([1.0, 0.995], "every teacher is at least 0.99 accurate there"),
        ([0.7, 1.0], "teacher 1 is right on every one of them"),
        ([0.9, 0.95], None),
    ],
)
def test_the_rule_that_reads_rows_as_the_teachers_training_rows(accuracies, why):
    labels = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(0))
    logits = teachers_on(labels, accuracies, 1)
    labels[::50] = -1  # unlabeled rows are not counted
    check = check_fit_rows(logits, torch.ones(2, 5, dtype=torch.bool), labels, "labeled rows")
    assert check["rows"] == 392 and check["near_perfect"] is (why is not None)
    assert check["why"] == why
    assert check_fit_rows(logits, torch.ones(2, 5, dtype=torch.bool), labels * 0 - 1, "x") is None


def test_calibrate_and_report_on_the_teachers_training_rows_say_so(
    digits_splits, overfit_teachers, tmp_path, caplog
):
    from kdplug.calibration import T_MIN
    from kdplug.engines.teachers import calibrate, report

    with caplog.at_level(logging.WARNING, logger="kdplug"):
        seen = calibrate(overfit_teachers, digits_splits["labeled"], str(tmp_path / "c.json"))
    assert seen["fit_rows"]["near_perfect"] and seen["fit_rows"]["teacher_accuracy"] == [1, 1]
    assert [entry["temperature"] for entry in seen["teachers"]] == pytest.approx([T_MIN, T_MIN])
    assert "the teachers look trained on the 150 rows of" in caplog.text
    assert "temperatures fitted there come out too sharp" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdplug"):
        held_out = calibrate(overfit_teachers, digits_splits["test"], str(tmp_path / "h.json"))
    assert not held_out["fit_rows"]["near_perfect"] and "too sharp" not in caplog.text
    assert all(entry["temperature"] > 1.01 * T_MIN for entry in held_out["teachers"])

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdplug"):
        judged = report(overfit_teachers, digits_splits["labeled"])
    assert judged["training_rows_check"]["near_perfect"]
    assert "not a held-out measure; report on labeled rows they did not see" in caplog.text
    judged = report(overfit_teachers, digits_splits["test"])
    assert not judged["training_rows_check"]["near_perfect"]
