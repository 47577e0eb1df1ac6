"""kdplug cache at scale: precomputed teachers are cached without decoding the data, the
one-pass top-k equals log-softmax + top-k + log-sum-exp of the rest, the store does not
depend on how rows are cut into shards and batches, and memory does not grow with N."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdplug.data import DataSource, load_data
from kdplug.engines.cache import CacheConfig, run_cache
from kdplug.ops import IMPOSSIBLE
from kdplug.store.reader import open_store
from kdplug.store.topk import TINY_TAIL, top_k_entries
from tests.memory_scale import peaks


def logits_teachers(folder, rows: int, classes: int, count: int = 2) -> list[str]:
    """``count`` row-aligned ``logits:`` teachers of random float32 logits."""
    rng = np.random.default_rng(0)
    specs = []
    for k in range(count):
        path = folder / f"t{k}.npy"
        np.save(path, (rng.normal(size=(rows, classes)) * 3).astype(np.float32))
        specs.append(f"logits:{path}")
    return specs


def reference_entries(log_probs: torch.Tensor, k: int):
    """The top-k entries as kdplug computed them before: log-softmax, top-k, log-sum-exp
    of the rest."""
    values, indices = log_probs.topk(k, dim=-1)
    rest = log_probs.scatter(-1, indices, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1).clamp_min(2 * IMPOSSIBLE)
    return values, indices, tail


def test_top_k_entries_in_one_pass_equal_the_log_sum_exp_of_the_rest():
    torch.manual_seed(0)
    scores = torch.randn(3, 64, 50) * 4
    scores[0, :8, 3] += 90  # confident rows: a tail far below TINY_TAIL (the exact path)
    scores[1, :, 40:] = 2 * IMPOSSIBLE  # classes a teacher does not know
    log_probs = torch.log_softmax(scores, -1)
    values, indices, tail = top_k_entries(log_probs, 5)
    want_values, want_indices, want_tail = reference_entries(log_probs, 5)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail, want_tail, rtol=1e-5, atol=1e-5)
    assert (tail[0, :8] < np.log(TINY_TAIL)).all() and (tail[0, :8] > -100).all()
    # raw scores give the same entries as their log-softmax
    raw = top_k_entries(scores, 5)
    torch.testing.assert_close(raw[0], values, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(raw[2], tail, rtol=1e-5, atol=1e-4)


def test_precomputed_teachers_are_cached_without_decoding_the_data(
    digits_splits, tmp_path, monkeypatch
):
    """Every teacher reads its outputs by row (``uses_inputs = False``): the images are
    never decoded, and the store holds the teachers' top-k log-probabilities."""
    spec = digits_splits["labeled"]
    rows = len(load_data(spec))
    teachers = logits_teachers(tmp_path, rows, 10)

    def no_decoding(self, indices):
        raise AssertionError(f"{self.spec}: rows decoded")

    monkeypatch.setattr(DataSource, "batch", no_decoding)
    config = CacheConfig(teachers, [spec], str(tmp_path / "store"), topk=3, dtype="float32")
    run_cache(config)
    split = open_store(tmp_path / "store").splits[0]
    logits = torch.from_numpy(np.stack([np.load(t.split(":", 1)[1]) for t in teachers]))
    want_values, want_indices, want_tail = reference_entries(torch.log_softmax(logits, -1), 3)
    assert np.array_equal(split.arrays["indices"][:, 0], want_indices.permute(1, 0, 2).numpy())
    np.testing.assert_allclose(
        split.arrays["values"][:, 0], want_values.permute(1, 0, 2).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(split.arrays["tail"][:, 0], want_tail.T.numpy(), atol=1e-5)


@pytest.mark.parametrize("topk", [None, 4])
def test_the_store_is_the_same_whatever_the_shards_and_batches(digits_splits, tmp_path, topk):
    """Shard and batch boundaries (7 and 5 rows, against one shard) change no byte."""
    spec = digits_splits["labeled"]
    teachers = logits_teachers(tmp_path, len(load_data(spec)), 10)
    stores = {}
    for shard_size, batch_size in ((7, 5), (4096, 256)):
        out = tmp_path / f"store-{shard_size}"
        config = CacheConfig(
            teachers, [spec], str(out), topk=topk, shard_size=shard_size, batch_size=batch_size
        )
        run_cache(config)
        stores[shard_size] = open_store(out).splits[0].arrays
    assert stores[7].keys() == stores[4096].keys()
    for name, array in stores[7].items():
        assert np.array_equal(array, stores[4096][name]), name


CACHE_RUN = """
from kdplug.engines.cache import CacheConfig, run_cache
images = np.zeros((rows, 2, 2), np.uint8)
datasets.Dataset.from_dict({"image": images}).save_to_disk(f"{folder}/data")
run_cache(CacheConfig(teachers, [f"disk:{folder}/data"], f"{folder}/store", topk=5,
                      classes=names, shard_size=4096, progress=False, device="cpu"))
"""


def test_peak_memory_does_not_grow_with_the_rows(tmp_path):
    """A subprocess caches N and 4N rows of a 300-class problem: the peak anonymous memory
    (the page cache of the memory-mapped teachers and store does not count) grows by at
    most 1.3x."""
    small, large = peaks(tmp_path, CACHE_RUN, (6_000, 24_000))
    assert large <= 1.3 * small, (small, large)
