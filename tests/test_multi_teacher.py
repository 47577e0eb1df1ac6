"""The fitted ``auto`` combiner, ``T=auto`` and the fit protocol (kdplug.fitting), on
synthetic teachers whose quality is known, checked against hand computations."""

import logging
import math

import numpy as np
import pytest
import torch
from kdplug_combiners.fitted import UNFITTED, Fitted

from kdplug import UsageError, metrics
from kdplug.fitting import (
    choose_temperature,
    combined_prediction,
    fit_components,
    held_out_targets,
    split_folds,
)
from kdplug.ops import IMPOSSIBLE
from kdplug.plugins import create
from tests.conftest import invoke_cli

C = 5


def labels_for(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed))


def teacher(labels: torch.Tensor, accuracy: float, scale: float, seed: int) -> torch.Tensor:
    """Logits ``[N, C]`` that favour the label on a fraction ``accuracy`` of the rows (the
    next class elsewhere), with noise, times ``scale`` (over-confidence)."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    z = torch.randn(n, C, generator=g)
    right = torch.rand(n, generator=g) < accuracy
    z[torch.arange(n), torch.where(right, labels, (labels + 1) % C)] += 3.0
    return z * scale


def full(K: int) -> torch.Tensor:
    return torch.ones(K, C, dtype=torch.bool)


def fit(spec: str, *teachers: torch.Tensor, labels: torch.Tensor):
    combiner = create("combiners", spec)
    record = combiner.fit(torch.stack(teachers), full(len(teachers)), labels)
    return combiner, record


def test_a_useless_teacher_gets_a_weight_near_zero():
    y = labels_for(300, 0)
    good, fair = teacher(y, 0.9, 2.0, 1), teacher(y, 0.75, 1.0, 2)
    noise = torch.randn(300, C, generator=torch.Generator().manual_seed(3)) * 3
    _, record = fit("auto", good, fair, noise, labels=y)
    assert record["weights"][2] < 0.05
    assert record["weights"][0] > record["weights"][1]


def test_two_copies_of_a_teacher_share_its_weight():
    y = labels_for(300, 4)
    a, b = teacher(y, 0.85, 2.0, 5), teacher(y, 0.8, 1.5, 6)
    _, alone = fit("auto,pool=linear", a, b, labels=y)
    _, twice = fit("auto,pool=linear", a, a, b, labels=y)
    assert twice["weights"][0] == pytest.approx(twice["weights"][1], abs=1e-3)
    assert twice["weights"][0] + twice["weights"][1] == pytest.approx(alone["weights"][0], abs=0.03)


def test_auto_is_never_less_accurate_than_the_best_teacher_on_the_labeled_rows():
    guarded = 0
    for seed in range(10, 18):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 3, (60,), generator=g)
        K = 3
        logits = torch.randn(K, 60, 3, generator=g) * torch.rand(K, 1, 1, generator=g) * 4
        bonus = torch.rand(K, 1, generator=g) * 2
        logits[torch.arange(K)[:, None], torch.arange(60), y.expand(K, 60)] += bonus
        known = torch.ones(K, 3, dtype=torch.bool)
        combiner = create("combiners", "auto,pool=log" if seed % 2 else "auto")
        record = combiner.fit(logits, known, y)
        guarded += record["guard"] is not None
        _, prediction = combiner.predict(logits, known, torch.full_like(y, -1))
        _, target = combiner(logits, known, torch.full_like(y, -1))
        best = max(metrics.accuracy(logits[k].softmax(-1), y) for k in range(K))
        assert metrics.accuracy(prediction, y) >= best
        assert metrics.accuracy(target, y) >= best
    assert guarded  # seeds 12, 17: the NLL-optimal pool alone would lose accuracy there


def test_the_target_takes_the_calibrated_teachers_when_their_own_outputs_lose_accuracy():
    y = labels_for(200, 30)
    flat_good = teacher(y, 0.9, 0.3, 31)  # accurate, but its own outputs are nearly flat
    sharp_weak = teacher(y, 0.85, 6.0, 32)  # less accurate and over-confident
    logits, unlabeled = torch.stack([flat_good, sharp_weak]), torch.full_like(y, -1)
    combiner = create("combiners", "auto")
    record = combiner.fit(logits, full(2), y)
    own = Fitted(combiner.fitted.temperatures, combiner.fitted.weights, combiner.fitted.pool)
    assert (
        metrics.accuracy(own.log_target(logits, full(2), 1.0), y)
        < record["accuracy"]["best_teacher"]
    )
    assert record["distillation_target"].startswith("calibrated teachers")
    assert combiner.fitted.calibrated_target
    _, target = combiner(logits, full(2), unlabeled, 2.0)
    expected = own.log_target(logits / combiner.fitted.temperatures.view(-1, 1, 1), full(2), 2.0)
    torch.testing.assert_close(target, expected.exp())
    assert (
        metrics.accuracy(combiner(logits, full(2), unlabeled)[1], y)
        >= record["accuracy"]["best_teacher"]
    )


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("pool", ["linear", "log"])
def test_fitted_combination_matches_a_hand_computation(pool):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, C)) * 2
    temperatures = np.array([0.5, 2.0, 1.5])
    weights = np.array([0.6, 0.3, 0.1])
    combiner = create("combiners", "auto")
    combiner.fitted = Fitted(
        torch.tensor(temperatures, dtype=torch.float32),
        torch.tensor(weights, dtype=torch.float32)[:, None].expand(3, C).clone(),
        pool,
    )
    z = torch.tensor(logits, dtype=torch.float32)
    unlabeled = torch.full((4,), -1)

    def pooled(p):  # p [K, B, C] -> the fitted pool [B, C]
        if pool == "linear":
            return np.einsum("k,kbc->bc", weights, p)
        return softmax(np.einsum("k,kbc->bc", weights, np.log(p)))

    # the prediction: every teacher calibrated, then pooled
    row_weights, prediction = combiner.predict(z, full(3), unlabeled)
    np.testing.assert_allclose(
        prediction.numpy(), pooled(softmax(logits / temperatures[:, None, None])), atol=1e-5
    )
    np.testing.assert_allclose(row_weights.numpy(), np.repeat(weights[:, None], 4, 1), atol=1e-6)
    # the target at the loss's T = 3: every teacher's own logits / 3, pooled alike
    target_weights, target = combiner(z, full(3), unlabeled, 3.0)
    np.testing.assert_allclose(target.numpy(), pooled(softmax(logits / 3.0)), atol=1e-5)
    torch.testing.assert_close(target_weights, row_weights)


def test_combined_prediction_is_predict_where_a_combiner_has_it():
    y = labels_for(30, 21)
    logits = torch.stack([teacher(y, 0.9, 3.0, 22), teacher(y, 0.7, 0.5, 23)])
    unlabeled = torch.full_like(y, -1)
    auto = create("combiners", "auto")
    auto.fit(logits, full(2), y)
    assert auto.fitted.temperatures[0] > 1.5  # an overconfident teacher, softened
    torch.testing.assert_close(
        combined_prediction(auto, logits, full(2), unlabeled)[1],
        auto.predict(logits, full(2), unlabeled)[1],
    )
    assert not torch.allclose(
        auto.predict(logits, full(2), unlabeled)[1], auto(logits, full(2), unlabeled)[1]
    )
    mean = create("combiners", "mean")  # no predict: its target at temperature 1
    torch.testing.assert_close(
        combined_prediction(mean, logits, full(2), unlabeled)[1],
        mean(logits, full(2), unlabeled, 1.0)[1],
    )


def probability_teachers(n: int, seed: int):
    """Two teachers that give probability exactly 0 (log p = IMPOSSIBLE) to some classes:
    a probability teacher with zeros on class 4 and at random, and a logit teacher that
    never predicts class 4 either."""
    y = labels_for(n, seed) % 4
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, C, generator=g) ** 3
    p[torch.rand(n, C, generator=g) < 0.3] = 0
    p[:, 4] = 0
    p[torch.arange(n), y] += 0.5
    p = p / p.sum(1, keepdim=True)
    log_p = torch.where(p > 0, p.log(), torch.full_like(p, IMPOSSIBLE))
    z = teacher(y, 0.8, 1.0, seed + 1)
    z[:, 4] = IMPOSSIBLE
    return torch.stack([log_p, z]), y


@pytest.mark.parametrize("spec", ["auto,pool=linear", "auto,pool=log", "auto,per_class=true"])
def test_probability_zeros_stay_zero_at_every_temperature(spec):
    logits, y = probability_teachers(120, 7)
    combiner = create("combiners", spec)
    record = combiner.fit(logits, full(2), y)
    zero_in_any = (logits <= IMPOSSIBLE).any(0)
    zero_in_all = (logits <= IMPOSSIBLE).all(0)
    for T in (1.0, 4.0, 1000.0):
        _, target = combiner(logits, full(2), torch.full_like(y, -1), T)
        assert (target[zero_in_all] == 0).all()
        if record["pool"] == "log":  # a product of experts: one zero is enough
            assert (target[zero_in_any] == 0).all()
        assert torch.isfinite(target).all()
        torch.testing.assert_close(target.sum(-1), torch.ones(len(y)))


def test_without_labeled_rows_auto_says_so_and_combines_like_mean(caplog):
    y = labels_for(50, 8)
    logits = torch.stack([teacher(y, 0.9, 1.0, 9), teacher(y, 0.6, 3.0, 10)])
    combiner = create("combiners", "auto")
    unlabeled = torch.full_like(y, -1)
    record = combiner.fit(logits, full(2), unlabeled)  # its record says what it does
    assert record == {"fitted": False, "rows": 0, "fallback": UNFITTED}
    mean_weights, mean_target = create("combiners", "mean")(logits, full(2), unlabeled, 2.0)
    weights, target = combiner(logits, full(2), unlabeled, 2.0)
    torch.testing.assert_close(weights, mean_weights)
    torch.testing.assert_close(target, mean_target)
    mean_prediction = create("combiners", "mean")(logits, full(2), unlabeled, 1.0)[1]
    torch.testing.assert_close(combiner.predict(logits, full(2), unlabeled)[1], mean_prediction)
    never_fitted = create("combiners", "auto")  # a caller that never calls fit is told once
    with caplog.at_level(logging.WARNING, logger="kdplug"):
        never_fitted(logits, full(2), unlabeled)
        never_fitted(logits, full(2), unlabeled)
    assert caplog.text.count(f"auto: not fitted on labeled rows; it combines {UNFITTED}") == 1


def test_a_teacher_that_knows_no_labeled_class_keeps_temperature_one():
    y = labels_for(80, 11) % 3
    known = full(2)
    known[1, :3] = False  # teacher 1 knows only classes 3 and 4, never a label here
    logits = torch.stack([teacher(y, 0.9, 1.0, 12), teacher(y, 0.9, 1.0, 13)])
    combiner = create("combiners", "auto")
    record = combiner.fit(logits, known, y)
    assert record["temperatures"][1] == 1.0
    _, target = combiner(logits, known, torch.full_like(y, -1))
    assert torch.isfinite(target).all()


def overconfident(n: int, scale: float, seed: int):
    """One teacher whose logits are ``scale`` times the logits the labels are drawn from."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, C, generator=g) * 1.5
    y = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(1)
    return (true * scale).unsqueeze(0), y


def test_T_auto_picks_the_temperature_that_undoes_over_confidence():
    logits, y = overconfident(2000, 4.0, 14)
    choice = choose_temperature(create("combiners", "mean"), logits, full(1), y)
    assert choice["T"] == 4.0
    nll = choice["held_out_nll"]
    assert nll["4"] < nll["3"] and nll["4"] < nll["6"]
    loss = create("losses", "kd,T=auto")
    record = fit_components(create("combiners", "mean"), loss, logits, full(1), y)
    assert loss.temperature == 4.0 and record["loss"]["T"] == 4.0
    assert repr(loss).startswith("kd(T=auto->4.0")


def test_T_auto_without_labeled_rows_is_a_usage_error():
    loss = create("losses", "dkd,T=auto")
    record = loss.fit(torch.zeros(1, 3, C), full(1), torch.full((3,), -1), None)
    assert record == {"T": None, "rows": 0}
    with pytest.raises(UsageError, match="dkd: T=auto is chosen on labeled rows"):
        loss.temperature  # noqa: B018


class Memorizer:
    """A fitted combiner that cheats: one-hot on the label of every row it was fitted on
    (recognized by its logits), uniform elsewhere."""

    def __init__(self):
        self.seen: dict[tuple, int] = {}

    def fit(self, logits, known, labels):
        for row, label in zip(logits[0].tolist(), labels.tolist()):
            self.seen[tuple(row)] = label
        return {"rows": len(labels)}

    def __call__(self, logits, known, labels, temperature=1.0):
        target = torch.full(logits.shape[1:], 1.0 / logits.shape[-1])
        for b, row in enumerate(logits[0].tolist()):
            if tuple(row) in self.seen:
                target[b] = torch.nn.functional.one_hot(torch.tensor(self.seen[tuple(row)]), C)
        return torch.ones(logits.shape[:2]), target


def test_held_out_targets_come_from_a_fit_without_the_row():
    y = labels_for(40, 15)
    logits = torch.randn(1, 40, C)
    held_out = held_out_targets(Memorizer(), logits, full(1), y)[1.0]
    np.testing.assert_allclose(held_out.numpy(), 1.0 / C)  # it never saw the rows it scored
    cheater = Memorizer()
    cheater.fit(logits, full(1), y)
    assert metrics.nll(cheater(logits, full(1), y)[1], y) < 1e-6


def test_folds_cover_every_row_once():
    parts = split_folds(23, 5)
    assert len(parts) == 5 and sorted(torch.cat(parts).tolist()) == list(range(23))
    assert split_folds(23, 5)[0].tolist() == parts[0].tolist()  # seeded


def test_fit_components_standardizes_for_a_standardizing_loss():
    seen = {}

    class Spy:
        def fit(self, logits, known, labels):
            seen["logits"] = logits
            return {"ok": True}

    logits = torch.randn(2, 10, C) * 5 + 3
    record = fit_components(
        Spy(), create("losses", "kd,standardize=true"), logits, full(2), labels_for(10, 16)
    )
    assert record["combiner"] == {"ok": True}
    row = seen["logits"][0, 0]
    assert abs(float(row.mean())) < 1e-4 and float(row.std()) == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("auto,pool=max", "auto: pool must be cv, linear or log"),
        ("auto,folds=1", "auto: folds must be an integer >= 2"),
        ("auto,reg=-1", "auto: reg must be >= 0"),
        ("kd,T=hot", "kd: T must be > 0 or auto"),
        ("dist,tau=auto", "dist: option tau='auto' must be float"),
    ],
)
def test_bad_options(spec, message):
    kind = "combiners" if spec.startswith("auto") else "losses"
    with pytest.raises(UsageError, match=message):
        create(kind, spec)


def test_called_with_another_teacher_count_than_fitted_is_an_error():
    y = labels_for(30, 17)
    combiner, _ = fit("auto", teacher(y, 0.9, 1.0, 18), teacher(y, 0.8, 1.0, 19), labels=y)
    with pytest.raises(UsageError, match="fitted on 2 teachers, called with 3"):
        combiner(torch.randn(3, 4, C), full(3), torch.full((4,), -1))


def test_per_class_weights_follow_the_teacher_that_is_right_on_each_class():
    y = labels_for(400, 20)
    a, b = teacher(y, 0.9, 2.0, 21), teacher(y, 0.9, 2.0, 22)
    a[y < 2] = torch.randn(int((y < 2).sum()), C) * 2  # teacher a is noise on classes 0, 1
    _, record = fit("auto,per_class=true,pool=linear", a, b, labels=y)
    weights = np.array(record["weights"])  # [K, C]
    assert weights[1, :2].min() > 0.7 and weights[1, :2].min() > weights[1, 2:].max()
    assert math.isclose(weights[:, 3].sum(), 1.0, abs_tol=1e-3)


# -- engines: kdplug label fits auto on --calibration-data ----------------------------------


@pytest.fixture(scope="module")
def digit_teachers(digits_splits, tmp_path_factory):
    """A logistic regression on the labeled digits, and a bad one trained with 45% of its
    labels moved to the next class (skops files)."""
    import skops.io
    from sklearn.linear_model import LogisticRegression

    from kdplug.data import load_data

    root = tmp_path_factory.mktemp("digit-teachers")
    source = load_data(digits_splits["labeled"])
    x, y, _ = source.batch(list(range(len(source))))
    rows, labels = x.flatten(1).numpy(), y.numpy()
    shifted = labels.copy()
    moved = np.random.default_rng(0).random(len(labels)) < 0.45
    shifted[moved] = (shifted[moved] + 1) % 10
    specs = []
    for name, target in (("good", labels), ("bad", shifted)):
        skops.io.dump(LogisticRegression(max_iter=300).fit(rows, target), root / f"{name}.skops")
        specs.append(f"sklearn:{root / name}.skops")
    return specs


def test_label_fits_auto_on_calibration_data_and_records_it(
    digits_splits, digit_teachers, tmp_path
):
    import json

    out = tmp_path / "labels"
    args = ["label", "--teacher", digit_teachers[0], "--teacher", digit_teachers[1]]
    args += ["--data", digits_splits["test"], "--out", str(out)]
    result = invoke_cli(*args, "--calibration-data", digits_splits["unlabeled"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    fitted = report["fitted"]["combiner"]
    assert report["combiner"] == "auto" and fitted["rows"] == 1200
    assert fitted["weights"][0] > 0.8  # the good teacher, on rows none of them trained on
    assert "combiner fitted on labeled rows" in result.stderr
    assert f"weights={fitted['weights']}" in result.stderr


def test_label_writes_the_calibrated_prediction(digits_splits, digit_teachers):
    from kdplug.data import batches, load_data
    from kdplug.engines.label import label_rows
    from kdplug.fitting import fit_on_rows
    from kdplug.progress import Progress
    from kdplug.teachers import build_teacher_set

    cpu = torch.device("cpu")
    source, labeled = load_data(digits_splits["test"]), load_data(digits_splits["unlabeled"])
    teacher_set = build_teacher_set(digit_teachers, source.classes)
    auto = create("combiners", "auto")
    fitted = fit_on_rows(auto, None, teacher_set, labeled, range(len(labeled)), 256, cpu)
    assert fitted["combiner"]["distillation_target"] == "the teachers' own outputs"
    written = label_rows(
        batches(source, 100, workers=0),
        len(source),
        teacher_set,
        auto,
        cpu,
        Progress("label", None, show=False),
    )
    x, _, idx = source.batch(list(range(len(source))))
    out = teacher_set(x, idx)
    unlabeled = torch.full((len(source),), -1)
    prediction = auto.predict(out.logits.float(), out.known, unlabeled)[1]
    torch.testing.assert_close(written["target"], prediction)
    target = auto(out.logits.float(), out.known, unlabeled)[1]  # not the distillation target
    assert (written["target"] - target).abs().max() > 0.1


def test_label_without_calibration_data_keeps_mean(digits_splits, digit_teachers, tmp_path):
    from kdplug.engines.label import LabelConfig, run_label

    config = LabelConfig(
        teachers=digit_teachers, data=digits_splits["test"], out=str(tmp_path / "l"), progress=False
    )
    report = run_label(config)
    assert report["combiner"] == "mean" and report["fitted"] == {}


def test_the_log_pool_must_beat_the_linear_pool_by_one_standard_error():
    from kdplug_combiners.fitted import choose_pool

    linear = torch.tensor([0.2, 0.4, 0.3, 0.5], dtype=torch.float64)
    difference = torch.tensor([0.09, -0.07, 0.06, -0.02], dtype=torch.float64)  # linear - log
    se = float(difference.std()) / 2  # sample std over sqrt(4) rows
    chosen, record = choose_pool({"linear": linear, "log": linear - difference})
    assert difference.mean() < se and chosen == "linear"  # better, but not by one SE
    assert record["cv_se"] == pytest.approx(se)
    assert choose_pool({"linear": linear, "log": linear - 0.1})[0] == "log"
    ruled_out = (linear - 0.1).clone()
    ruled_out[2] = math.inf  # a held-out label the log pool gave probability 0
    chosen, record = choose_pool({"linear": linear, "log": ruled_out})
    assert chosen == "linear" and record["cv_nll"]["log"] is None


def test_backward_elimination_flags_the_teacher_whose_removal_lowers_the_nll():
    from kdplug.selection import backward_elimination

    y = labels_for(300, 23)
    good, fair = teacher(y, 0.9, 1.0, 24), teacher(y, 0.8, 1.0, 25)
    wrong = teacher((y + 2) % C, 0.9, 2.0, 26)  # confidently wrong
    logits = torch.stack([good, wrong, fair])
    record = backward_elimination(
        lambda: create("combiners", "mean"), logits, full(3), y, ["good", "wrong", "fair"]
    )
    assert [f["teacher"] for f in record["flagged"]] == ["wrong"]
    assert record["recommended"] == ["good", "fair"]
    p = torch.stack([good, fair]).softmax(-1).mean(0)
    nll = -p[torch.arange(300), y].log().mean()
    assert record["nll_recommended"] == pytest.approx(float(nll), rel=1e-5)
    assert record["nll_all"] > record["nll_recommended"]


def test_teachers_report_recommends_a_subset_and_scores_auto_held_out(
    digits_splits, digit_teachers, monkeypatch
):
    from kdplug_combiners.fitted import Auto

    from kdplug.engines.teachers import format_report, report

    fits = []
    monkeypatch.setattr(
        Auto, "_fit", lambda self, *a, _fit=Auto._fit: fits.append(1) or _fit(self, *a)
    )
    result = report(digit_teachers, digits_splits["unlabeled"])
    # the held-out score of all the teachers is made once, for the table and the selection
    # (FOLDS fits), then FOLDS fits for each teacher left out in the one round
    assert len(digit_teachers) == 2 and len(fits) == 5 + 2 * 5
    selection = result["selection"]
    names = [t["name"] for t in result["teachers"]]
    assert [f["teacher"] for f in selection["flagged"]] == [names[1]]
    assert selection["recommended"] == [names[0]]
    assert selection["recommended_specs"] == [digit_teachers[0]]
    auto = next(c for c in result["combiners"] if c["name"] == "auto")
    assert auto["held_out"] and auto["accuracy"] >= result["teachers"][0]["accuracy"] - 0.01
    assert selection["nll_all"] == pytest.approx(auto["nll"], rel=1e-5)
    text = format_report(result)
    assert "flagged: " in text and "recommended: " in text and "auto (held out)" in text


def test_cv_keeps_the_linear_pool_when_a_teacher_rules_out_classes_others_support():
    logits, y = probability_teachers(120, 27)
    _, record = fit("auto", *logits, labels=y)
    assert record["pool"] == "linear" and record["cv_nll"] == {}
    assert record["pool_choice"] == "linear: exact zeros (no log pool)"
    logits[0] = logits[0].clamp_min(-20.0)  # the same teacher without exact zeros
    logits[1, :, 4] = -20.0
    _, record = fit("auto", *logits, labels=y)
    assert record["pool_choice"] == "cv" and set(record["cv_nll"]) == {"linear", "log"}


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("pool", ["linear", "log"])
def test_the_weight_fits_objective_is_the_pools_nll_by_hand(pool, per_class):
    """PoolNLL (what fit_weights minimizes) against numpy: teachers that know different
    classes (class 4 by none), weights renormalized over the teachers that know a class."""
    from kdplug_combiners.fitted import PoolNLL, class_weights

    rng = np.random.default_rng(5)
    known = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    z = rng.normal(size=(3, 40, C)) * 2
    z[~known.numpy()[:, None, :].repeat(40, 1)] = -np.inf
    p = softmax(z)
    labels = torch.tensor(rng.choice([0, 1, 2, 3], 40))
    raw = rng.uniform(0.1, 1.0, size=(3, C)) if per_class else np.array([[0.5], [0.3], [0.2]])
    weights = class_weights(torch.tensor(raw / raw.sum(0)).expand(3, C), known)
    w = weights.numpy()  # [K, C], 0 where a teacher does not know the class
    if pool == "linear":
        mix = np.einsum("kc,knc->nc", w, p)
        pooled = mix / mix.sum(1, keepdims=True)
    else:
        score = np.einsum(
            "kc,knc->nc", w, np.where(p > 0, np.log(np.maximum(p, 1e-300)), IMPOSSIBLE)
        )
        score[:, 4] = IMPOSSIBLE
        pooled = softmax(score)
    expected = -np.log(pooled[np.arange(40), labels.numpy()]).mean()
    with np.errstate(divide="ignore"):
        log_p = torch.tensor(np.log(p))
    objective = PoolNLL(log_p, known, labels, pool, per_class)
    assert float(objective(weights)) == pytest.approx(expected, rel=1e-10)


def test_auto_fits_a_fixed_sample_of_at_most_fit_values_values():
    from kdplug_combiners.fitted import MIN_ROWS

    y = labels_for(MIN_ROWS + 300, 31)
    teachers = teacher(y, 0.9, 2.0, 32), teacher(y, 0.6, 1.0, 33)
    _, all_rows = fit("auto,fit_values=100000", *teachers, labels=y)
    assert all_rows["rows"] == len(y) and all_rows["sample"] is None
    _, sampled = fit(f"auto,fit_values={MIN_ROWS * C}", *teachers, labels=y)
    assert sampled["rows"] == MIN_ROWS
    assert (
        sampled["sample"]
        == f"a random {MIN_ROWS} of {len(y)} rows (fit_values={MIN_ROWS * C} at {C} classes)"
    )
    # the sample: the first MIN_ROWS of a seeded permutation, the same on every run
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:MIN_ROWS]
    chosen = chosen.sort().values
    _, by_hand = fit("auto", *(t[chosen] for t in teachers), labels=y[chosen])
    assert sampled["temperatures"] == by_hand["temperatures"]
    assert sampled["weights"] == by_hand["weights"]
    # never fewer than MIN_ROWS rows, whatever fit_values says
    _, tiny = fit("auto,fit_values=1", *teachers, labels=y)
    assert tiny["rows"] == MIN_ROWS
    with pytest.raises(UsageError, match="fit_values must be an integer >= 1"):
        create("combiners", "auto,fit_values=0")
