"""The teacher store: views rebuilt bit for bit, stored outputs vs live teachers, top-k
rebuild error, stale and corrupt stores, bad input on the command line."""

import math
import shutil

import numpy as np
import pytest
import torch

import kdplug
from kdplug import UsageError
from kdplug.augment_views import ViewAugment, rebuild_views, sample_views
from kdplug.data import load_data
from kdplug.engines.cache import CacheConfig, run_cache
from kdplug.engines.label import LabelConfig, run_label
from kdplug.engines.teachers import report
from kdplug.ops import IMPOSSIBLE
from kdplug.store.producer import store_producer
from kdplug.store.reader import open_store
from kdplug.store.topk import full_log_probs, top_k_entries
from tests.conftest import invoke_cli

AUGMENT = "scale=0.3;1,brightness=0.3,contrast=0.3"


def resized_crop_by_hand(image: np.ndarray, box, flip: bool) -> np.ndarray:
    """Bilinear sampling of ``image [C, H, W]`` at the centers of an ``H x W`` grid laid
    over ``box`` (normalized x0, y0, x1, y1), mirrored when ``flip``; edges clamped."""
    C, H, W = image.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.empty_like(image, dtype=np.float64)
    for i in range(H):
        for j in range(W):
            jj = W - 1 - j if flip else j
            sx = min(max((x0 + (jj + 0.5) / W * (x1 - x0)) * W - 0.5, 0), W - 1)
            sy = min(max((y0 + (i + 0.5) / H * (y1 - y0)) * H - 0.5, 0), H - 1)
            left, top = min(int(sx), W - 2), min(int(sy), H - 2)
            fx, fy = sx - left, sy - top
            patch = image[:, top : top + 2, left : left + 2].astype(np.float64)
            out[:, i, j] = (
                patch[:, 0, 0] * (1 - fx) * (1 - fy)
                + patch[:, 0, 1] * fx * (1 - fy)
                + patch[:, 1, 0] * (1 - fx) * fy
                + patch[:, 1, 1] * fx * fy
            )
    return out


def test_views_are_resized_crops_and_rebuild_bit_for_bit_in_any_batch():
    x = torch.rand(12, 3, 8, 10)
    params = sample_views(ViewAugment(scale=(0.2, 1.0)), 12, 4, 8, 10, np.random.default_rng(3))
    assert (params.seeds[:, 0] == 0).all() and (params.seeds[:, 1:] != 0).all()
    assert (params.boxes[:, 0] == [0, 0, 1, 1]).all() and not params.flips[:, 0].any()
    x0, y0, x1, y1 = np.moveaxis(params.boxes[:, 1:], -1, 0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1 + 1e-6).all() and (y1 <= 1 + 1e-6).all()
    assert ((x1 - x0) * (y1 - y0) <= 1 + 1e-6).all()

    augment = ViewAugment()
    boxes = torch.from_numpy(params.boxes[:, 2])
    flips = torch.from_numpy(params.flips[:, 2])
    seeds = torch.from_numpy(params.seeds[:, 2])
    views = rebuild_views(x, boxes, flips, seeds, augment)
    for row in range(12):
        expected = resized_crop_by_hand(x[row].numpy(), boxes[row], bool(flips[row]))
        np.testing.assert_allclose(views[row].numpy(), expected, atol=1e-5)
    # another batch composition (reversed, and a subset) gives exactly the same pixels
    order = torch.arange(11, -1, -1)
    again = rebuild_views(x[order], boxes[order], flips[order], seeds[order], augment)
    assert torch.equal(again, views[order])
    assert torch.equal(
        rebuild_views(x[3:5], boxes[3:5], flips[3:5], seeds[3:5], augment), views[3:5]
    )
    # seed 0 is the plain view
    plain = rebuild_views(x, boxes, flips, torch.zeros(12, dtype=torch.int64), augment)
    assert torch.equal(plain, x)


def test_brightness_scales_each_view_by_one_factor_within_its_range():
    x = torch.rand(6, 1, 8, 8) * 0.5 + 0.1  # never clipped by a factor <= 1.5
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(6, 1)
    seeds = torch.arange(1, 7, dtype=torch.int64) * 977
    views = rebuild_views(
        x, full, torch.zeros(6, dtype=torch.bool), seeds, ViewAugment(brightness=0.4)
    )
    ratio = (views / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    assert ((ratio[:, 0] >= 0.6) & (ratio[:, 0] <= 1.4)).all()
    assert len(set(ratio[:, 0].tolist())) == 6


def test_full_log_probs_keeps_top_k_and_spreads_the_rest_evenly():
    probs = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.06, 0.04], [0.0, 0.7, 0.15, 0.1, 0.05, 0.0]])
    known = torch.tensor([[True] * 6, [True, True, True, True, True, False]])
    log_probs = torch.log(probs.clamp_min(1e-30))[:, None, :]  # [T=2, B=1, C=6]
    values, indices, tail = top_k_entries(log_probs, 2)
    assert torch.allclose(tail.exp()[:, 0], torch.tensor([0.3, 0.15]))
    rebuilt = full_log_probs(values, indices, tail, known).exp()[:, 0]
    # teacher 1 does not know class 5: its tail (0.15) goes to classes 0, 3 and 4 only
    expected = torch.tensor(
        [[0.5, 0.2, 0.075, 0.075, 0.075, 0.075], [0.05, 0.7, 0.15, 0.05, 0.05, 0.0]]
    )
    assert torch.allclose(rebuilt, expected, atol=1e-6)
    # all classes stored: values back as they are, unknown classes at IMPOSSIBLE
    whole = full_log_probs(log_probs, None, None, known)
    assert whole[1, 0, 5] == IMPOSSIBLE and torch.equal(whole[0], log_probs[0])


def test_top_k_rebuild_error_is_within_the_tail_bound():
    torch.manual_seed(0)
    logits = torch.randn(3, 500, 20) * torch.tensor([1.0, 3.0, 6.0])[:, None, None]
    known = torch.ones(3, 20, dtype=torch.bool)
    log_p = torch.log_softmax(logits, -1)
    for k in (1, 5, 10):
        values, indices, tail = top_k_entries(log_p, k)
        rebuilt = full_log_probs(values, indices, tail, known)
        p = log_p.exp()
        kl = (p * (log_p - rebuilt)).sum(-1)
        bound = tail.exp() * math.log(20 - k)
        assert (kl <= bound + 1e-5).all() and (kl >= -1e-6).all()
        assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(3, 500), atol=1e-5)
        print(f"k={k}: mean KL {kl.mean():.4f}, mean tail mass {tail.exp().mean():.3f}")


class ProbePlugin:
    """Two deterministic teachers that record every input they are given: a linear map
    to the 10 digits, and one that knows only digits 0..4."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.randn(64, 10, generator=generator) * 3
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        plugin = self

        class Probe:
            def __init__(self, classes):
                self.classes = classes

            def __call__(self, x):
                plugin.calls.append(x.clone())
                return x.flatten(1) @ plugin.weights[:, : len(self.classes)]

        self.probe = Probe

    @kdplug.hookimpl
    def register_teachers(self, register):
        register("probe", lambda ref: self.probe([str(c) for c in range(int(ref))]))


@pytest.fixture
def probe(register_plugin):
    plugin = ProbePlugin()
    register_plugin(plugin, "probe")
    return plugin


def cache(tmp_path, name, teachers, data, **options):
    config = dict(views=3, augment=AUGMENT, shard_size=64, batch_size=32, device="cpu")
    config.update(options)
    return run_cache(
        CacheConfig(
            teachers=teachers, data=data, out=str(tmp_path / name), progress=False, **config
        )
    )


def test_store_round_trip_views_and_outputs_match_the_live_teachers(probe, digits_splits, tmp_path):
    data = digits_splits["labeled"]
    info = cache(tmp_path, "full", ["probe:10", "probe:5"], [data])
    assert (info["views"], info["topk"], info["dtype"]) == (3, None, "float16")
    assert info["teachers"][1]["unknown_classes"] == [5, 6, 7, 8, 9]
    store = open_store(tmp_path / "full")
    source = load_data(data)
    x, _, idx = source.batch(list(range(len(source))))
    split = store.splits[0]
    assert split.fingerprint == source.fingerprint and split.rows == 150

    # the teachers were called per batch (32 rows, shards of 64) and view, both teachers in turn
    batches = [
        (s, min(s + 32, e))
        for a in range(0, 150, 64)
        for e in [min(a + 64, 150)]
        for s in range(a, e, 32)
    ]
    assert len(probe.calls) == len(batches) * 3 * 2
    stored = np.asarray(split.arrays["values"], dtype=np.float32)  # [N, V, T, C]
    for b, (start, stop) in enumerate(batches):
        rows = np.arange(start, stop)
        for v in range(3):
            seen = probe.calls[(b * 3 + v) * 2]
            assert torch.equal(probe.calls[(b * 3 + v) * 2 + 1], seen)
            rebuilt = store.view_inputs(split, x[rows], rows, np.full(len(rows), v))
            assert torch.equal(rebuilt, seen), (b, v)  # bit for bit
            if v == 0:
                assert torch.equal(seen, x[rows])
            live = torch.log_softmax(seen.flatten(1) @ probe.weights, -1)
            got = torch.from_numpy(stored[rows, v, 0])
            assert (got - live).abs().le(1e-3 + live.abs() * 2**-10).all()
    # the same views rebuilt all at once, rows reversed
    order = np.arange(149, -1, -1)
    views = np.arange(150) % 3
    everything = store.view_inputs(split, x[order.copy()], order, views[order])
    for row in (0, 77, 149):
        b = next(i for i, (s, e) in enumerate(batches) if s <= row < e)
        seen = probe.calls[(b * 3 + views[row]) * 2][row - batches[b][0]]
        assert torch.equal(everything[149 - row], seen)
    # teacher 1 knows 5 classes: read back, the others are impossible
    logits, bad = store.read(split, np.arange(150), views)
    assert logits.shape == (2, 150, 10) and not bad.any()
    assert (logits[1, :, 5:] == IMPOSSIBLE).all() and (logits[1, :, :5] > IMPOSSIBLE).all()

    # top-3 store of the same views: the live top-3 classes, and a bounded rebuild error
    cache(tmp_path, "top3", ["probe:10", "probe:5"], [data], topk=3)
    top = open_store(tmp_path / "top3")
    assert np.array_equal(top.splits[0].arrays["boxes"], split.arrays["boxes"])
    rows = np.arange(150)
    for v in range(3):
        view = top.view_inputs(top.splits[0], x, rows, np.full(150, v))
        live = torch.log_softmax(view.flatten(1) @ probe.weights, -1)  # exact, float32
        values, indices = live.topk(3, dim=-1)
        stored_indices = np.asarray(top.splits[0].arrays["indices"][:, v, 0], dtype=np.int64)
        assert (torch.from_numpy(stored_indices) == indices).all()
        approx, _ = top.read(top.splits[0], rows, np.full(150, v))
        kl = (live.exp() * (live - approx[0])).sum(-1)
        tail = 1 - values.exp().sum(-1)
        # float16 storage moves each kept probability by < 0.1%: a KL of order 1e-7
        assert (kl <= tail * math.log(10 - 3) + 1e-5).all()
        assert (approx[1, :, 5:] == IMPOSSIBLE).all()


def test_stale_teacher_or_changed_data_is_refused_unless_forced(
    digits_splits, tmp_path, monkeypatch
):
    from tests.teacher_fixtures import TinyCNN

    monkeypatch.setenv("KDPLUG_ALLOW_CODE", "1")  # TorchScript is code: trust this one

    torch.manual_seed(0)
    teacher_file = tmp_path / "t.pt"
    torch.jit.save(torch.jit.script(TinyCNN().eval()), teacher_file)
    original = load_data(digits_splits["labeled"]).dataset
    original.save_to_disk(str(tmp_path / "data"))
    data = f"disk:{tmp_path / 'data'}"
    teacher = f"torchscript:{teacher_file}"
    run_cache(CacheConfig([teacher], [data], str(tmp_path / "s"), device="cpu", progress=False))
    train = load_data(data)
    producer = store_producer(str(tmp_path / "s"), train, None, train.classes)
    assert producer.specs == [teacher] and producer.names == ["t"] and producer.rows == 150

    shutil.copy(teacher_file, tmp_path / "t.orig")
    torch.manual_seed(1)
    torch.jit.save(torch.jit.script(TinyCNN().eval()), teacher_file)
    with pytest.raises(UsageError, match=r"teacher torchscript:.*t\.pt, whose file .* has changed"):
        store_producer(str(tmp_path / "s"), train, None, train.classes)
    with pytest.raises(UsageError, match="has changed"):
        kdplug.plugins.create("teachers", f"store:{tmp_path / 's'}")
    store_producer(f"{tmp_path / 's'},force=true", train, None, train.classes)
    kdplug.plugins.create("teachers", f"store:{tmp_path / 's'},force=true")
    resumed = CacheConfig([teacher], [data], str(tmp_path / "s"), device="cpu", resume=True)
    with pytest.raises(UsageError, match="teacher .* has changed since the shards"):
        run_cache(resumed)
    resumed.force = True  # the finished store is kept as it was cached
    assert run_cache(resumed)["teachers"][0]["fingerprint"] == producer.fingerprints()[0]

    shutil.copy(tmp_path / "t.orig", teacher_file)
    shutil.rmtree(tmp_path / "data")
    original.select(range(149, -1, -1)).save_to_disk(str(tmp_path / "data"))  # rows reordered
    train = load_data(data)
    with pytest.raises(UsageError, match=r"has changed since it was cached into store"):
        store_producer(f"{tmp_path / 's'},force=false", train, None, train.classes)
    producer = store_producer(f"{tmp_path / 's'},force=true", train, None, train.classes)
    assert producer.rows == 150
    # the store as a teacher source: same row count, other data; label and report refuse it
    stored = f"store:{tmp_path / 's'}"
    label = LabelConfig([stored], data, str(tmp_path / "labels"), device="cpu", progress=False)
    with pytest.raises(UsageError, match="holds outputs for other data .* force=true"):
        run_label(label)
    with pytest.raises(UsageError, match="holds outputs for other data"):
        report([stored], data)
    assert report([f"{stored},force=true"], data)["teachers"][0]["accuracy"] is not None
    other = load_data(digits_splits["test"])
    with pytest.raises(UsageError, match="holds no split for .*447 rows"):
        store_producer(f"{tmp_path / 's'},force=true", other, None, other.classes)


def test_corrupt_truncated_or_unfinished_stores_are_refused(digits_splits, tmp_path):
    from tests.teacher_fixtures import TinyCNN

    torch.jit.save(torch.jit.script(TinyCNN().eval()), tmp_path / "t.pt")
    config = CacheConfig(
        [f"torchscript:{tmp_path / 't.pt'},allow_code=true"],
        [digits_splits["labeled"]],
        str(tmp_path / "s"),
        topk=3,
        device="cpu",
        progress=False,
    )
    run_cache(config)
    open_store(tmp_path / "s")
    values = tmp_path / "s" / "split-0" / "values.npy"
    content = values.read_bytes()
    values.write_bytes(content[: len(content) // 2])
    with pytest.raises(
        UsageError, match=r"corrupt or truncated .*values\.npy|corrupt or truncated"
    ):
        open_store(tmp_path / "s")
    np.save(values, np.zeros((150, 1, 1, 2), dtype=np.float16))
    with pytest.raises(UsageError, match=r"split-0/values\.npy holds float16\[150, 1, 1, 2\]"):
        open_store(tmp_path / "s")
    (tmp_path / "s" / "store.json").write_text("{not json")
    with pytest.raises(UsageError, match="corrupt or truncated"):
        open_store(tmp_path / "s")
    (tmp_path / "s" / "store.json").unlink()
    with pytest.raises(UsageError, match="unfinished .* --resume"):
        open_store(tmp_path / "s")
    with pytest.raises(UsageError, match="does not exist"):
        open_store(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"views": 2, "augment": "scale=2;3"}, "--augment: scale must satisfy 0 < low"),
        ({"augment": "hflip=0"}, "--augment needs --views 2 or more"),
        ({"topk": 10}, "--topk 10 keeps every one of the 10 classes"),
        ({"dtype": "int8"}, "--dtype must be one of float16, float32"),
    ],
)
def test_bad_cache_options_are_refused(change, message, probe, digits_splits, tmp_path):
    config = CacheConfig(["probe:10"], [digits_splits["labeled"]], str(tmp_path / "s"), **change)
    with pytest.raises(UsageError, match=message):
        run_cache(config)
    assert not (tmp_path / "s").exists()


def test_bad_input_on_the_command_line_exits_2_with_one_line(digits_splits, tmp_path):
    result = invoke_cli(
        *["cache", "--teacher", "torchscript:missing.pt", "--data", digits_splits["labeled"]],
        *["--out", str(tmp_path / "s"), "--views", "2", "--augment", "ratio=0"],
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --augment: ratio must be two numbers like 0.5;1, got 0"
    ]
    assert not (tmp_path / "s").exists()
