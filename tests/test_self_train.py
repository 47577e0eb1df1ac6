"""kdplug self-train: rounds of labeling and noisy-student training."""

import json

import numpy as np
import pytest
import skops.io
from sklearn.linear_model import LogisticRegression

from kdplug.data import load_data
from kdplug.engines.self_train import pseudo_rows, write_targets
from kdplug.errors import UsageError
from tests.conftest import invoke_cli


def invoke(*args):
    """The kdplug CLI in this process (click's runner): its result, stdout and stderr."""
    from click.testing import CliRunner

    from kdplug.cli import build_cli

    return CliRunner().invoke(build_cli(), [str(a) for a in args])


@pytest.fixture(scope="module")
def logreg(digits_splits, tmp_path_factory):
    """A logistic regression fitted on the labeled digits, saved with skops."""
    from kdplug.data import batches

    source = load_data(digits_splits["labeled"])
    x, y, _ = next(iter(batches(source, len(source))))
    path = tmp_path_factory.mktemp("teachers") / "logreg.skops"
    skops.io.dump(LogisticRegression(max_iter=2000).fit(x.flatten(1).numpy(), y.numpy()), path)
    return f"sklearn:{path}"


def labels_dataset(path, probs: np.ndarray, accepted: list[bool]):
    """A labels dataset as ``kdplug label`` writes it (the columns self-train reads), saved
    at ``path``: row i at position ``len - 1 - i`` of the unlabeled data."""
    import datasets

    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            "accepted": datasets.Value("bool"),
            "probs": datasets.Sequence(datasets.Value("float32"), length=probs.shape[1]),
        }
    )
    rows = {"index": list(range(len(probs)))[::-1], "accepted": accepted, "probs": probs.tolist()}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return pseudo_rows(path)


def test_targets_are_one_hot_then_the_accepted_rows_soft_labels(tmp_path, monkeypatch):
    from kdplug.engines import self_train

    monkeypatch.setattr(self_train, "TARGET_BLOCK", 12)  # 4 rows of 3 classes: 4 + 2, 4 + 1
    probs = np.array(
        [[0.2, 0.8, 0.0], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4], [0, 0, 1]],
        dtype=np.float32,
    )
    accepted = [True, False, True, False, True]
    labeled, positions = labels_dataset(tmp_path / "labels", probs, accepted)
    assert positions.tolist() == [4, 2, 0]
    train = np.array([2, 0, 1, 1, 0, 2])
    spec = write_targets(train, labeled, ["a", "b", "c"], tmp_path / "t.npy")
    assert (spec.name, spec.ref) == ("logits", str(tmp_path / "t.npy"))
    assert spec.options == {"probs": True, "classes": ["a", "b", "c"]}
    saved = np.load(tmp_path / "t.npy")
    assert saved.dtype == np.float32
    assert saved.tolist() == [*np.eye(3)[train].tolist(), *probs[accepted].tolist()]


def self_train_args(teacher, splits, out, rounds, epochs, generator) -> list[str]:
    return [
        *["self-train", "--teacher", teacher, "--student", "timm:test_resnet"],
        *["--train", splits["labeled"], "--unlabeled", splits["unlabeled"]],
        *["--val", splits["test"], "--out", str(out), "--rounds", str(rounds)],
        *["--epochs", str(epochs), "--generator", generator, "--device", "cpu"],
    ]


def test_two_rounds_end_to_end(digits_splits, logreg, tmp_path):
    out = tmp_path / "self"
    args = self_train_args(logreg, digits_splits, out, 2, 2, "threshold,tau=0.5")
    result = invoke_cli(*args)
    assert result.exit_code == 0, result.output
    table = [line.split() for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [row[:2] for row in table] == [["0", "0"], ["1", "1"], ["2", "2"]]
    summary = json.loads((out / "self_train.json").read_text())
    first = summary["rounds"][0]
    baseline = summary["baseline"]  # round 0: the student on the labeled rows alone
    assert baseline["round"] == 0 and baseline["student"] == str(out / "baseline" / "student")
    assert (out / "baseline" / "student" / "model.safetensors").exists()
    scored = [baseline, *summary["rounds"]]
    best = max(scored, key=lambda row: row["val_accuracy"])
    assert (summary["best_round"], summary["best_student"]) == (best["round"], best["student"])
    assert [float(row[-1]) for row in table] == [round(r["val_accuracy"], 4) for r in scored]
    assert result.stdout.splitlines()[-2].startswith(f"best: round {best['round']} ")
    assert best["student"] in result.stdout.splitlines()[-2]
    labels = load_data(f"disk:{out / 'round-1' / 'labels'}").dataset
    accepted = int(np.sum(labels["accepted"]))
    assert first["accepted"] == accepted > 0
    assert np.load(out / "round-1" / "targets.npy").shape == (150 + accepted, 10)
    assert len(load_data(f"disk:{out / 'round-1' / 'pseudo'}")) == accepted
    assert (out / "round-2" / "distill" / "student" / "model.safetensors").exists()
    assert (out / "rounds.png").stat().st_size > 0
    assert 0.0 <= first["val_accuracy"] <= 1.0 and first["pseudo_label_accuracy"] > 0.8
    again = invoke_cli(*args, "--resume")  # a finished run resumes to the same table
    assert again.exit_code == 0 and [r[:3] for r in table] == [
        line.split()[:3] for line in again.stdout.splitlines() if line[:5].strip().isdigit()
    ]


def test_no_accepted_row_is_a_clear_error(digits_splits, logreg, tmp_path):
    args = self_train_args(logreg, digits_splits, tmp_path / "s", 1, 1, "threshold,tau=1.0")
    result = invoke_cli(*args)
    assert result.exit_code == 2
    said = [line for line in result.stderr.strip().splitlines() if "INFO" not in line]
    assert said == [
        "Error: round 1: the generator threshold,tau=1.0 accepted no row; lower its threshold"
    ]


def test_rounds_hand_the_engines_specs_built_from_values(
    digits_splits, logreg, tmp_path, monkeypatch
):
    """Every spec text that reaches a registry is one the user wrote; what the engine adds
    (targets, the round's student, its loss, its data) arrives as a Spec of Python values."""
    from kdplug.engines.self_train import SelfTrainConfig, self_train
    from kdplug.registry import Registry
    from kdplug.spec import Spec

    seen: list = []
    real_create = Registry.create

    def spying(self, spec, *args, **extra):
        seen.append(spec)
        return real_create(self, spec, *args, **extra)

    monkeypatch.setattr(Registry, "create", spying)
    cfg = SelfTrainConfig(
        teachers=[logreg],
        student="timm:test_resnet",
        train=digits_splits["labeled"],
        unlabeled=digits_splits["unlabeled"],
        val=digits_splits["test"],
        out=str(tmp_path / "self"),
        rounds=2,
        epochs=1,
        generator="threshold,tau=0.5",
        device="cpu",
    )
    rows = self_train(cfg, echo=lambda line: None)
    assert len(rows) == 2
    written = {logreg, cfg.student, cfg.generator, cfg.combiner}
    texts = {spec for spec in seen if isinstance(spec, str)}
    assert texts <= written, texts - written
    built = {(s.name, s.ref) for s in seen if isinstance(s, Spec) and s.raw is None}
    student = str(tmp_path / "self" / "round-1" / "distill" / "student")
    assert ("kdplug", student) in built and ("kd", None) in built
    assert ("logits", str(tmp_path / "self" / "round-2" / "targets.npy")) in built
    students = [s for s in seen if isinstance(s, Spec) and s.name == "timm"]
    assert students and all(s.raw["drop_path_rate"] == "0.1" for s in students)


@pytest.fixture(scope="module")
def unlabeled_without_labels(digits_splits, tmp_path_factory):
    """The unlabeled digits with their label column removed (their labels: eval-labels)."""
    path = tmp_path_factory.mktemp("bare") / "unlabeled"
    load_data(digits_splits["unlabeled"]).dataset.remove_columns("label").save_to_disk(str(path))
    return f"disk:{path}"


def one_round(teacher, splits, out, **options):
    from kdplug.engines.self_train import SelfTrainConfig

    given = {"unlabeled": splits["unlabeled"], "rounds": 1, "epochs": 1, "device": "cpu"}
    return SelfTrainConfig(
        teachers=[teacher],
        student="timm:test_resnet",
        train=splits["labeled"],
        val=splits["test"],
        out=str(out),
        **{**given, **options},
    )


def test_eval_labels_score_each_round_and_the_run_names_its_best_student(
    digits_splits, logreg, unlabeled_without_labels, tmp_path
):
    """Unlabeled rows without labels are scored against --eval-labels; label's default
    generator labels them; round 0 is the labels-only baseline; the best round is named."""
    from kdplug.engines.label import LabelConfig
    from kdplug.engines.self_train import run_self_train

    truth = load_data(digits_splits["unlabeled"]).labels()
    cfg = one_round(
        logreg,
        digits_splits,
        tmp_path / "self",
        unlabeled=unlabeled_without_labels,
        eval_labels=digits_splits["unlabeled"],
    )
    lines: list[str] = []
    summary = run_self_train(cfg, echo=lines.append)
    labels = load_data(f"disk:{tmp_path / 'self' / 'round-1' / 'labels'}").dataset
    accepted = np.asarray(labels["accepted"], dtype=bool)
    hand = float(np.mean(np.asarray(labels["label"])[accepted] == truth[accepted]))
    (first,) = summary["rounds"]
    assert first["pseudo_label_accuracy"] == pytest.approx(hand) and hand > 0.8
    label_default = LabelConfig([], "", "").generator
    assert summary["config"]["generator"] == label_default
    assert summary["config"]["batch_size"] == 128
    rounds = {0: summary["baseline"], 1: first}
    best = 1 if first["val_accuracy"] > summary["baseline"]["val_accuracy"] else 0
    assert summary["best_round"] == best
    assert summary["best_student"] == rounds[best]["student"]
    assert summary["best_val_accuracy"] == rounds[best]["val_accuracy"]
    saved = json.loads((tmp_path / "self" / "self_train.json").read_text())
    assert saved["best_round"] == best and saved["baseline"] == summary["baseline"]
    assert lines[-1].startswith("round 0: labels only, student val accuracy ")


def test_eval_labels_of_another_length_are_refused_before_any_work(digits_splits, logreg, tmp_path):
    from kdplug.engines.self_train import run_self_train

    out = tmp_path / "self"
    cfg = one_round(logreg, digits_splits, out, eval_labels=digits_splits["labeled"])
    with pytest.raises(UsageError) as refused:
        run_self_train(cfg)
    assert str(refused.value) == (
        f"--eval-labels {digits_splits['labeled']} has 150 rows, --unlabeled has 1200; "
        "they must match row for row"
    )
    assert not out.exists()


@pytest.mark.parametrize("flag", ["train", "unlabeled", "val"])
def test_tabular_data_is_refused_before_any_work_leaving_out_as_found(flag, tmp_path):
    """The teacher labels iris well; self-train still refuses at once data of another kind
    than the student's (or than --train's), and an --out given with --overwrite keeps what
    it held."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    path = tmp_path / "iris.skops"
    skops.io.dump(LogisticRegression(max_iter=500).fit(iris.data, iris.target), path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data = {"train": "sklearn:digits", "unlabeled": "sklearn:digits", "val": "sklearn:digits"}
    data[flag] = "sklearn:iris"
    result = invoke(
        *["self-train", "--teacher", f"sklearn:{path}", "--student", "timm:test_resnet"],
        *[arg for name, spec in data.items() for arg in (f"--{name}", spec)],
        *["--out", out, "--overwrite", "--epochs", "1", "--device", "cpu"],
    )
    assert result.exit_code == 2, result.output
    refused = {
        "train": "Error: --unlabeled sklearn:digits holds images but --train sklearn:iris is "
        "tabular",
        "unlabeled": "Error: --unlabeled sklearn:iris is tabular but --train sklearn:digits "
        "holds images",
        "val": "Error: --val sklearn:iris is tabular but --train sklearn:digits holds images",
    }
    assert result.stderr.strip().splitlines() == [refused[flag]]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["distill", "eval", "self-train"])
def test_the_commands_that_train_or_score_students_name_the_student_of_each_kind(command):
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / f"{command}.md"
    shown = invoke(command, "--help").output
    for text in (" ".join(shown.split()), " ".join(page.read_text().split())):
        assert "timm" in text and "tabular:mlp" in text


def test_a_combiner_that_fits_is_fitted_on_the_train_rows(digits_splits, tmp_path):
    from kdplug.engines.self_train import combiner_fit_rows

    cfg = one_round("logits:x.npy", digits_splits, tmp_path / "s", combiner="auto")
    assert combiner_fit_rows(cfg) == digits_splits["labeled"]
    cfg = one_round("logits:x.npy", digits_splits, tmp_path / "s", combiner="mean")
    assert combiner_fit_rows(cfg) is None


def test_rounds_png_draws_val_accuracy_against_the_baseline_on_a_readable_range(
    tmp_path, monkeypatch
):
    """Two rounds 0.005 apart are not drawn as a cliff: the y range is at least 0.1 wide."""
    import kdplug.reports.figures as figures
    from kdplug.engines.self_train import plot_rounds

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.append(fig))
    baseline = {"round": 0, "val_accuracy": 0.931, "student": "b"}
    rows = [{"round": 1, "val_accuracy": 0.954}, {"round": 2, "val_accuracy": 0.949}]
    plot_rounds(baseline, rows, rows[0], tmp_path / "rounds.png")
    (ax,) = drawn[0].axes
    low, high = ax.get_ylim()
    assert high - low >= 0.1 and low <= 0.931 and 0.954 <= high <= 1.0
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["self-train student"].get_ydata()) == [0.954, 0.949]
    assert set(lines["labels only (round 0): 0.931"].get_ydata()) == {0.931}
    assert list(lines["best: round 1"].get_xdata()) == [1]
    at_top = [{"round": 1, "val_accuracy": 1.0}]
    plot_rounds(baseline | {"val_accuracy": 0.995}, at_top, at_top[0], tmp_path / "r.png")
    assert drawn[1].axes[0].get_ylim() == pytest.approx((0.9, 1.0))


def test_a_rounds_rows_are_read_as_the_pool_is_read(digits_splits, tmp_path):
    """The pool's data options (here image_size=16) reach the round's saved rows, so distill
    sees them at the size the labeled rows have (it refused 8x8 against 16x16)."""
    from kdplug.engines.self_train import write_round_data

    pool = f"{digits_splits['unlabeled']},image_size=16"
    spec = write_round_data(load_data(pool), np.arange(5), tmp_path / "pseudo", pool)
    rows = load_data(spec)
    assert len(rows) == 5 and tuple(rows.input_shape) == tuple(load_data(pool).input_shape)
    assert tuple(rows.input_shape) == (1, 16, 16)
