"""The streaming label engine: generators decide shard by shard exactly what they decide on
all rows at once, a version-1 generator still runs, and memory does not grow with N."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from kdplug.api import Labels, LabelShards, ShardRows
from kdplug.engines.label import LabelConfig, run_label
from kdplug.plugins import create
from tests.memory_scale import peaks

SPECS = [
    "threshold,tau=0.6",
    "threshold,tau=0.9,floor=0.25",
    "soft",
    "topk,k=3",
    "class-balanced",
    "class-balanced,per_class=40",
    "class-balanced,quantile=0.3",
    "adaptive",
    "adaptive,warmup=true",
    "agreement,min_agree=2",
    "dawid-skene",
    "dawid-skene,soft=false",
    "dawid-skene,init=mean,max_iter=7",
    "pate,sigma=0.7,threshold=2,sigma1=0.5",
]


def teachers(K: int = 3, N: int = 600, C: int = 7, seed: int = 0):
    """``(target [N, C], teacher_probs [K, N, C], known [K, C])``: teachers right on 60-80%
    of the rows, one of them lacking a class."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(K, N, C, generator=g)
    for k in range(K):
        right = torch.rand(N, generator=g) < 0.6 + 0.1 * k
        logits[k, right, truth[right]] += 3.0
    known = torch.ones(K, C, dtype=torch.bool)
    known[K - 1, C - 1] = False
    probs = torch.softmax(logits.masked_fill(~known.unsqueeze(1), -1e9), -1)
    return probs.mean(0), probs, known


def shards_of(target, probs, known, edges):
    """``LabelShards`` cutting the rows at ``edges``."""
    cuts = [0, *edges, len(target)]
    parts = [
        ShardRows(torch.arange(a, b), target[a:b], probs[:, a:b].argmax(-1), known, probs[:, a:b])
        for a, b in zip(cuts, cuts[1:])
    ]
    return LabelShards.of(parts)


@pytest.mark.parametrize("spec", SPECS)
def test_a_generator_decides_shard_by_shard_what_it_decides_on_all_rows(spec):
    target, probs, known = teachers()
    whole = create("label-generators", spec)(target, probs, known)
    streamed = create("label-generators", spec)
    shards = shards_of(target, probs, known, [1, 250, 251, 444])
    streamed.prepare(shards)
    parts = [streamed.decide(rows) for rows in shards]
    assert torch.equal(torch.cat([p.label for p in parts]), whole.label)
    assert torch.equal(torch.cat([p.accepted for p in parts]), whole.accepted)
    assert torch.allclose(torch.cat([p.probs for p in parts]), whole.probs, atol=1e-6)
    info = streamed.summary()
    assert info.keys() == whole.info.keys()
    for key, value in whole.info.items():
        # dawid-skene's soft E-step multiplies in float32, in blocks that shards cut apart
        assert info[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_class_balanced_keeps_the_most_confident_rows_of_each_class_across_shards():
    target, probs, known = teachers(N=300, C=4)
    generator = create("label-generators", "class-balanced,per_class=10,min_confidence=0")
    shards = shards_of(target, probs, known, [7, 150])
    generator.prepare(shards)
    accepted = torch.cat([generator.decide(rows).accepted for rows in shards])
    confidence, predicted = target.max(1)
    for c in range(4):  # an independent count: the 10 most confident rows predicted as c
        mine = (predicted == c).nonzero().flatten()
        top = mine[confidence[mine].argsort(descending=True, stable=True)[:10]]
        assert set(accepted.nonzero().flatten().tolist()) & set(mine.tolist()) == set(top.tolist())


class AllAtOnce:
    """A version-1 generator (kdplug 0.1): one call on all rows, no ``decide``."""

    calls: list[int] = []

    def __call__(self, target, teacher_probs, known):
        AllAtOnce.calls.append(len(target))
        confidence, predicted = target.max(1)
        accepted = confidence > 0.5
        label = torch.where(accepted, predicted, -1)
        return Labels(label, accepted, target, {"rows_seen": len(target)})


def test_a_version_1_generator_runs_on_all_rows_at_once(
    register_plugin, digits_splits, tmp_path, caplog
):
    import kdplug

    class Plugin:
        @kdplug.hookimpl
        def register_label_generators(self, register):
            register("all-at-once", AllAtOnce)

    register_plugin(Plugin(), name="old-style")
    rng = np.random.default_rng(0)
    rows = len(datasets.load_from_disk(digits_splits["unlabeled"].split(":", 1)[1]))
    np.save(tmp_path / "t.npy", rng.normal(size=(rows, 10)).astype(np.float32) * 3)
    AllAtOnce.calls.clear()
    caplog.set_level("INFO", "kdplug")
    report = run_label(
        LabelConfig(
            [f"logits:{tmp_path / 't.npy'}"],
            digits_splits["unlabeled"],
            str(tmp_path / "out"),
            generator="all-at-once",
            shard_size=100,
            progress=False,
        )
    )
    assert AllAtOnce.calls == [rows]  # once, with every row
    assert report["generator"]["contract"] == 1
    assert report["generator"]["info"] == {"rows_seen": rows}
    written = datasets.load_from_disk(str(tmp_path / "out"))
    target = torch.softmax(torch.from_numpy(np.load(tmp_path / "t.npy")), 1)
    expected = torch.where(target.max(1).values > 0.5, target.argmax(1), -1)
    assert written["label"] == expected.tolist()
    assert "takes all" in caplog.text and "held in memory together" in caplog.text


@pytest.mark.parametrize("spec", ["threshold,floor=0.25", "class-balanced", "dawid-skene", "pate"])
def test_the_dataset_is_the_same_whatever_the_shard_size(digits_splits, tmp_path, spec):
    rng = np.random.default_rng(1)
    rows = len(datasets.load_from_disk(digits_splits["unlabeled"].split(":", 1)[1]))
    teachers_ = []
    for k in range(3):
        np.save(tmp_path / f"t{k}.npy", rng.normal(size=(rows, 10)).astype(np.float32) * (k + 1))
        teachers_.append(f"logits:{tmp_path / f't{k}.npy'}")
    written = []
    for size in (37, 100_000):
        out = tmp_path / f"out{size}"
        run_label(
            LabelConfig(
                teachers_,
                digits_splits["unlabeled"],
                str(out),
                generator=spec,
                shard_size=size,
                progress=False,
            )
        )
        written.append(datasets.load_from_disk(str(out)).with_format("numpy")[:])
        report = json.loads((out / "report.json").read_text())
    for column in written[0]:
        assert np.allclose(written[0][column], written[1][column], atol=1e-6), column
    assert report["generator"]["contract"] == 2


def test_full_topk_and_no_probs_are_written_as_asked(digits_splits, tmp_path):
    rng = np.random.default_rng(2)
    rows = len(datasets.load_from_disk(digits_splits["unlabeled"].split(":", 1)[1]))
    np.save(tmp_path / "t.npy", rng.normal(size=(rows, 10)).astype(np.float32))
    spec = f"logits:{tmp_path / 't.npy'}"
    columns = {}
    for probs in ("auto", "full", "topk=3", "none"):
        out = tmp_path / probs.replace("=", "")
        report = run_label(
            LabelConfig([spec], digits_splits["unlabeled"], str(out), probs=probs, progress=False)
        )
        dataset = datasets.load_from_disk(str(out))
        columns[probs] = dataset
        assert report["probs"]["spec"] == probs
    assert "probs" in columns["auto"].column_names  # 10 classes: full by default
    full = np.asarray(columns["full"].with_format("numpy")["probs"])
    values = np.asarray(columns["topk=3"].with_format("numpy")["topk_values"])
    indices = np.asarray(columns["topk=3"].with_format("numpy")["topk_indices"])
    assert np.allclose(values, -np.sort(-full, axis=1)[:, :3])
    assert np.allclose(np.take_along_axis(full, indices, 1), values)
    assert "probs" not in columns["none"].column_names
    assert "topk_values" not in columns["none"].column_names


def test_probs_auto_keeps_the_top_10_above_100_classes():
    from kdplug.label_dataset import probs_mode

    assert probs_mode("auto", None, 100) == ("full", None)
    assert probs_mode("auto", None, 101) == ("topk", 10)
    assert probs_mode("auto", 5, 1000) == ("topk", 5)
    assert probs_mode("full", 5, 1000) == ("full", None)
    assert probs_mode("topk=20", None, 7) == ("topk", 7)


@pytest.mark.parametrize("text", ["topk", "topk=0", "half", "full,k=2"])
def test_a_wrong_probs_option_is_one_line(text):
    from kdplug.errors import UsageError
    from kdplug.label_dataset import probs_mode

    with pytest.raises(UsageError, match="--probs must be auto, full, topk=K"):
        probs_mode(text, None, 10)


LABEL_RUN = """
from kdplug.engines.label import LabelConfig, run_label
datasets.Dataset.from_dict({"x": np.zeros(rows, np.float32)}).save_to_disk(f"{folder}/data")
run_label(LabelConfig(teachers, f"disk:{folder}/data", f"{folder}/out", classes=names,
                      generator="threshold,floor=0.25", shard_size=4096, progress=False,
                      device="cpu"))
"""


def test_peak_memory_does_not_grow_with_the_rows(tmp_path):
    """A subprocess labels N and 4N rows of a 300-class problem: the peak anonymous memory
    (the page cache of the memory-mapped teachers does not count) grows by at most 1.3x.
    Before the engine streamed, the 4N run held [K, N, C] several times over."""
    small, large = peaks(tmp_path, LABEL_RUN, (12_000, 48_000))
    assert large <= 1.3 * small, (small, large)
