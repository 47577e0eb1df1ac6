"""`kdplug label` end to end on the digits splits, with real teachers made here."""

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import kdplug
from kdplug import UsageError
from kdplug.data import load_data
from kdplug.engines.label import LabelConfig, run_label
from kdplug.file_hashes import file_hash
from kdplug.plugins import create
from tests.conftest import invoke_cli


def train_cnn(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 64, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def teachers(digits_splits, tmp_path_factory) -> list[str]:
    """Three teacher specs: a TorchScript CNN, a scikit-learn model (skops) and a weak CNN."""
    import skops.io
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("teachers")
    labeled = load_data(digits_splits["labeled"])
    x, y, _ = labeled.batch(list(range(len(labeled))))
    torch.jit.save(torch.jit.script(train_cnn(x, y, 60, seed=0)), root / "cnn.pt")
    torch.jit.save(torch.jit.script(train_cnn(x, y, 3, seed=1)), root / "weak.pt")
    model = LogisticRegression(max_iter=300).fit(x.reshape(len(x), -1).numpy(), y.numpy())
    skops.io.dump(model, root / "logreg.skops")
    return [
        f"torchscript:{root / 'cnn.pt'},allow_code=true",
        f"sklearn:{root / 'logreg.skops'}",
        f"torchscript:{root / 'weak.pt'},allow_code=true",
    ]


def teacher_probs_by_hand(specs: list[str], data: str) -> torch.Tensor:
    """``[K, N, C]`` softmax of each teacher over all rows, computed outside the engine."""
    source = load_data(data)
    x, _, _ = source.batch(list(range(len(source))))
    with torch.no_grad():
        return torch.stack([torch.softmax(create("teachers", s)(x).float(), 1) for s in specs])


def test_label_cli_writes_the_dataset_and_a_report_that_matches_a_hand_count(
    teachers, digits_splits, tmp_path
):
    out = tmp_path / "labels"
    data = digits_splits["unlabeled"]
    args = ["--data", data, "--out", str(out), "--generator", "threshold,tau=0.6"]
    args += ["--shard-size", "500", "--batch-size", "128", "--with-inputs"]
    result = invoke_cli("label", *[a for t in teachers for a in ("--teacher", t)], *args)
    assert result.exit_code == 0, result.output
    assert "labeled 1200 rows" in result.stdout

    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == [
        "image",
        *["index", "label", "accepted", "confidence", "entropy", "agreement", "probs"],
    ]
    assert ds.features["label"].names == [str(i) for i in range(10)]
    assert not (out / ".shards").exists()
    rows = ds.with_format("numpy")[:]
    truth = load_data(data).labels()
    assert rows["index"].tolist() == list(range(1200))
    assert np.array_equal(np.stack(rows["image"]), np.stack(load_data(data).dataset["image"]))

    # the labels, recomputed from the teachers by hand: mean of softmaxes, max p >= 0.6
    probs_k = teacher_probs_by_hand(teachers, data).numpy()
    target = probs_k.mean(0)
    expected_accepted = target.max(1) >= 0.6
    assert np.allclose(rows["probs"], target, atol=1e-5)
    assert np.array_equal(rows["accepted"], expected_accepted)
    assert np.array_equal(rows["label"], np.where(expected_accepted, target.argmax(1), -1))
    assert np.allclose(rows["confidence"], target.max(1), atol=1e-5)
    entropy = -(target * np.log(np.clip(target, 1e-30, None))).sum(1)
    assert np.allclose(rows["entropy"], entropy, atol=1e-4)
    row_class = target.argmax(1)
    assert np.allclose(rows["agreement"], (probs_k.argmax(2) == row_class).mean(0))

    report = json.loads((out / "report.json").read_text())
    accepted = rows["accepted"]
    assert report["rows"] == 1200 and report["accepted"] == int(accepted.sum())
    assert report["coverage"] == pytest.approx(accepted.mean())
    assert report["per_class"] == {str(c): int((rows["label"] == c).sum()) for c in range(10)}
    assert report["mean_confidence"] == pytest.approx(float(rows["confidence"][accepted].mean()))
    hand_accuracy = (rows["label"][accepted] == truth[accepted]).mean()
    assert report["eval"]["accuracy_accepted"] == pytest.approx(hand_accuracy)
    assert report["eval"]["accuracy_all"] == pytest.approx((row_class == truth).mean())
    assert report["eval"]["accuracy_accepted"] > report["eval"]["accuracy_all"]
    order = np.lexsort((np.arange(1200), -rows["confidence"]))
    for point in report["eval"]["accuracy_vs_coverage"]:
        n = round(point["coverage"] * 1200)
        top = order[:n]
        assert point["accuracy"] == pytest.approx((row_class[top] == truth[top]).mean())
    assert report["eval"]["accuracy_vs_coverage"][-1]["coverage"] == 1.0

    for k, entry in enumerate(report["teachers"]):
        assert entry["spec"] == teachers[k]
        assert entry["fingerprint"] == file_hash(teachers[k].split(":", 1)[1].split(",")[0])
        votes = probs_k[k].argmax(1)
        assert entry["accuracy"] == pytest.approx((votes == truth).mean())
        assert entry["agreement"] == pytest.approx(
            (votes[accepted] == rows["label"][accepted]).mean()
        )
        assert entry["mean_weight"] == pytest.approx(1 / 3)
    assert report["teachers"][2]["accuracy"] < report["teachers"][0]["accuracy"]
    assert report["generator"] == {
        "spec": "threshold,tau=0.6",
        "name": "threshold",
        "options": {"tau": 0.6, "floor": 0.0, "accuracy": None, "class_rows": 30},
        "info": {},
        "fit": None,
        "contract": 2,
    }
    assert report["data"]["fingerprint"] == load_data(data).fingerprint
    assert report["versions"]["kdplug"] == kdplug.__version__
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def label_in_process(teachers, data, out, generator, **options) -> tuple[dict, datasets.Dataset]:
    config = LabelConfig(
        teachers=teachers, data=data, out=str(out), generator=generator, progress=False, **options
    )
    report = run_label(config)
    return report, datasets.load_from_disk(str(out))


def test_topk_writes_top_k_columns_instead_of_probs(teachers, digits_splits, tmp_path):
    report, ds = label_in_process(teachers, digits_splits["test"], tmp_path / "o", "topk,k=3")
    assert "probs" not in ds.column_names
    values = np.stack(ds["topk_values"])
    indices = np.stack(ds["topk_indices"])
    assert values.shape == indices.shape == (447, 3)
    assert np.allclose(values.sum(1), 1, atol=1e-5) and (np.diff(values, axis=1) <= 0).all()
    assert np.array_equal(indices[:, 0], np.asarray(ds["label"]))
    target = teacher_probs_by_hand(teachers, digits_splits["test"]).mean(0)
    mass_kept = target.topk(3, dim=1).values.sum(1).mean()
    assert report["generator"]["info"]["mass_kept"] == pytest.approx(float(mass_kept), abs=1e-5)
    assert report["accepted"] == 447


def test_pate_writes_no_per_teacher_column_and_reports_epsilon(teachers, digits_splits, tmp_path):
    generator = "pate,sigma=0.5,threshold=2.5,sigma1=0.5,delta=1e-6"
    report, ds = label_in_process(teachers, digits_splits["test"], tmp_path / "o", generator)
    assert "agreement" not in ds.column_names
    info = report["generator"]["info"]
    answered = info["answered"]
    assert answered == report["accepted"] == sum(ds["accepted"])
    slope = answered / 0.5**2 + 447 / (2 * 0.5**2)
    assert info["epsilon"] == pytest.approx(slope + 2 * math.sqrt(slope * math.log(1e6)))
    assert report["generator"]["options"] == {
        "sigma": 0.5,
        "threshold": 2.5,
        "sigma1": 0.5,
        "seed": 0,
        "delta": 1e-6,
    }


def test_dawid_skene_reports_each_teachers_estimated_accuracy(teachers, digits_splits, tmp_path):
    report, _ = label_in_process(teachers, digits_splits["test"], tmp_path / "o", "dawid-skene")
    estimated = report["generator"]["info"]["teacher_accuracy"]
    measured = [t["accuracy"] for t in report["teachers"]]
    assert np.allclose(estimated, measured, atol=0.1), (estimated, measured)
    assert estimated[2] == min(estimated)


class NaNTeacher:
    """Digits teacher that returns NaN logits for rows whose index is a multiple of 7."""

    uses_row_index = True
    classes = [str(i) for i in range(10)]

    def __call__(self, x, index):
        logits = x.reshape(len(x), -1)[:, :10] * 10
        return torch.where((index % 7 == 0)[:, None], torch.nan, logits)


class NaNPlugin:
    @kdplug.hookimpl
    def register_teachers(self, register):
        def nan(ref: str):
            """A teacher giving NaN on every 7th row."""
            return NaNTeacher()

        register("nan", nan)


def test_skip_bad_rows_rejects_and_counts_them(register_plugin, digits_splits, tmp_path):
    register_plugin(NaNPlugin(), "nan-plugin")
    data = digits_splits["test"]
    with pytest.raises(UsageError, match="teacher nan:x returned NaN or Inf logits in batch 0"):
        label_in_process(["nan:x"], data, tmp_path / "a", "soft")
    assert not (tmp_path / "a" / "report.json").exists()
    report, ds = label_in_process(["nan:x"], data, tmp_path / "b", "soft", skip_bad_rows=True)
    bad = np.arange(447) % 7 == 0
    assert report["bad_rows"] == bad.sum()
    assert np.array_equal(~np.asarray(ds["accepted"]), bad)
    assert np.allclose(np.stack(ds["probs"])[bad], 0.1)


def test_eval_labels_come_from_another_dataset_row_for_row(teachers, digits_splits, tmp_path):
    labeled = load_data(digits_splits["test"]).dataset
    bare = tmp_path / "bare"
    labeled.remove_columns("label").save_to_disk(str(bare))
    classes = [str(i) for i in range(10)]
    with pytest.raises(UsageError, match="has no label column to take class names from"):
        label_in_process(teachers[:1], f"disk:{bare}", tmp_path / "a", "soft")
    report, _ = label_in_process(
        teachers[:1],
        f"disk:{bare}",
        tmp_path / "b",
        "soft",
        classes=classes,
        eval_labels=digits_splits["test"],
    )
    truth = np.asarray(labeled["label"])
    probs = teacher_probs_by_hand(teachers[:1], digits_splits["test"])[0].numpy()
    assert report["eval"]["accuracy_accepted"] == pytest.approx((probs.argmax(1) == truth).mean())
    with pytest.raises(UsageError, match="has 150 rows, DATA has 447"):
        label_in_process(
            teachers[:1],
            f"disk:{bare}",
            tmp_path / "c",
            "soft",
            classes=classes,
            eval_labels=digits_splits["labeled"],
        )


def test_on_labels_written_is_called_with_the_report(
    register_plugin, teachers, digits_splits, tmp_path
):
    seen = []

    class Listener:
        @kdplug.hookimpl
        def on_labels_written(self, run, path, report):
            seen.append((run, path, report))

    register_plugin(Listener(), "listener")
    report, _ = label_in_process(teachers[:1], digits_splits["test"], tmp_path / "o", "soft")
    ((run, path, hooked),) = seen
    assert path == str(tmp_path / "o") and hooked == report
    assert run.config["generator"] == "soft" and run.state["shards"] == 1


def test_finished_run_resumes_as_a_no_op_and_refuses_a_different_run(
    teachers, digits_splits, tmp_path
):
    out = tmp_path / "o"
    data = digits_splits["test"]
    report, _ = label_in_process(teachers[:1], data, out, "soft")
    again, _ = label_in_process(teachers[:1], data, out, "soft", resume=True)
    assert again == report
    with pytest.raises(UsageError, match="already holds a run; use --resume"):
        label_in_process(teachers[:1], data, out, "soft")
    with pytest.raises(UsageError, match="holds a run with a different configuration"):
        label_in_process(teachers[:2], data, out, "soft", resume=True)
    with pytest.raises(UsageError, match="finished run made with generator 'soft' .now 'thre"):
        label_in_process(teachers[:1], data, out, "threshold", resume=True)
    other, _ = label_in_process(teachers[:1], data, out, "threshold", overwrite=True)
    assert other["generator"]["name"] == "threshold"


def test_a_failed_generator_is_rerun_on_the_finished_shards(teachers, digits_splits, tmp_path):
    out = tmp_path / "o"
    data = digits_splits["test"]
    with pytest.raises(UsageError, match="agreement: min_agree=2 but the run has 1 teachers"):
        label_in_process(teachers[:1], data, out, "agreement", shard_size=200)
    assert len(list((out / ".shards").iterdir())) == 3
    report, ds = label_in_process(teachers[:1], data, out, "soft", shard_size=200, resume=True)
    assert report["rows_labeled_this_run"] == 0 and len(ds) == 447


def test_empty_data_is_refused(teachers, tmp_path):
    empty = tmp_path / "empty.parquet"
    load_data("sklearn:digits").dataset.select([]).to_parquet(str(empty))
    with pytest.raises(UsageError, match="the dataset is empty"):
        label_in_process(teachers[:1], f"parquet:{empty}", tmp_path / "o", "soft")
    assert not (tmp_path / "o").exists()


def test_a_logits_file_with_another_row_count_is_refused(digits_splits, tmp_path):
    rows = len(load_data(digits_splits["test"]))
    np.save(tmp_path / "logits.npy", np.zeros((rows + 5, 10), dtype=np.float32))
    with pytest.raises(UsageError, match=f"holds {rows + 5} rows but the data has {rows}"):
        label_in_process(
            [f"logits:{tmp_path / 'logits.npy'}"], digits_splits["test"], tmp_path / "o", "soft"
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--generator", "treshold"], "unknown label generator 'treshold'; did you mean"),
        (["--generator", "threshold,tau=1.5"], "threshold: tau must be in [0, 1], got 1.5"),
    ],
)
def test_cli_mistakes_are_one_line_with_exit_code_2(
    teachers, digits_splits, tmp_path, extra, message
):
    out = tmp_path / "o"
    result = invoke_cli(
        "label",
        "--teacher",
        teachers[0],
        "--data",
        digits_splits["test"],
        "--out",
        str(out),
        *extra,
    )
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_an_out_dir_holding_something_else_is_left_alone(teachers, digits_splits, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not a kdplug run directory"):
        label_in_process(teachers[:1], digits_splits["test"], out, "soft")
    with pytest.raises(UsageError, match="--resume and --overwrite exclude each other"):
        label_in_process(
            teachers[:1], digits_splits["test"], out, "soft", resume=True, overwrite=True
        )
    assert [p.name for p in Path(out).iterdir()] == ["notes.txt"]


def test_calibration_temperatures_divide_the_teachers_logits(teachers, digits_splits, tmp_path):
    spec = teachers[0]
    calibration = tmp_path / "calib.json"
    entry = {
        "spec": spec,
        "fingerprint": file_hash(spec.split(":", 1)[1].split(",")[0]),
        "temperature": 2.5,
    }
    calibration.write_text(json.dumps({"teachers": [entry]}))
    data = digits_splits["test"]
    report, ds = label_in_process(
        [spec], data, tmp_path / "o", "soft,T=1", calibration=str(calibration)
    )
    source = load_data(data)
    x, _, _ = source.batch(list(range(len(source))))
    with torch.no_grad():
        expected = torch.softmax(create("teachers", spec)(x) / 2.5, 1).numpy()
    assert np.allclose(np.stack(ds["probs"]), expected, atol=1e-5)
    assert report["teachers"][0]["temperature"] == 2.5
    assert report["calibration"] == str(calibration)
