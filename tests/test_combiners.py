"""Combiners against independent loop computations on small hand-made teacher outputs."""

import math

import numpy as np
import pytest
import torch

from kdplug import UsageError
from kdplug.ops import IMPOSSIBLE
from kdplug.plugins import create

# K = 3 teachers, B = 3 rows, C = 4 classes
LOGITS = np.array(
    [
        [[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [-1.0, 2.5, 0.0, 0.0]],
        [[1.0, 1.0, 0.0, -2.0], [3.0, -1.0, 0.0, 1.0], [0.0, 0.5, 0.5, 1.5]],
        [[0.0, 4.0, 1.0, 0.0], [0.5, 0.5, 2.0, -0.5], [2.0, 0.0, 1.0, -1.0]],
    ]
)
LABELS = np.array([0, -1, 3])
FULL = np.ones((3, 4), dtype=bool)


def softmax(z) -> np.ndarray:
    z = np.asarray(z, dtype=float)
    e = np.exp(z - z.max())
    return e / e.sum()


def probs(logits: np.ndarray, known: np.ndarray, T: float = 1.0) -> np.ndarray:
    """Each teacher's softmax at T over the classes it knows (0 elsewhere), [K, B, C]."""
    out = np.zeros_like(logits)
    for k in range(logits.shape[0]):
        for b in range(logits.shape[1]):
            out[k, b, known[k]] = softmax(logits[k, b, known[k]] / T)
    return out


def mix(weights: np.ndarray, p: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Per class: weighted mean over the teachers that know it; then each row sums to 1."""
    K, B, C = p.shape
    target = np.zeros((B, C))
    for b in range(B):
        for c in range(C):
            w = [weights[k, b] for k in range(K) if known[k, c]]
            if sum(w) > 0:
                target[b, c] = sum(
                    weights[k, b] * p[k, b, c] for k in range(K) if known[k, c]
                ) / sum(w)
        target[b] /= target[b].sum()
    return target


def entropy_weights(p: np.ndarray) -> np.ndarray:
    K, B, _ = p.shape
    H = np.array(
        [[-sum(x * math.log(x) for x in p[k, b] if x > 0) for b in range(B)] for k in range(K)]
    )
    return (1 - H / H.sum(0)) / (K - 1)


def combine(spec, logits=LOGITS, known=FULL, labels=LABELS, T=1.0):
    weights, target = create("combiners", spec)(
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(known),
        torch.tensor(labels),
        T,
    )
    assert weights.shape == logits.shape[:2] and target.shape == logits.shape[1:]
    return weights.numpy().astype(float), target.numpy().astype(float)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_mean_averages_probabilities(T):
    weights, target = combine("mean", T=T)
    np.testing.assert_allclose(weights, np.full((3, 3), 1 / 3), atol=1e-7)
    np.testing.assert_allclose(target, probs(LOGITS, FULL, T).mean(0), atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_mean_logits_is_softmax_of_mean_logits(T):
    weights, target = combine("mean-logits", T=T)
    np.testing.assert_allclose(weights, np.full((3, 3), 1 / 3), atol=1e-7)
    expected = np.stack([softmax(LOGITS[:, b].mean(0) / T) for b in range(3)])
    np.testing.assert_allclose(target, expected, atol=1e-6)


def test_weighted_normalizes_the_given_weights():
    weights, target = combine("weighted:weights=2;1;1", T=2.0)
    np.testing.assert_allclose(weights, np.array([[0.5] * 3, [0.25] * 3, [0.25] * 3]), atol=1e-7)
    expected = np.einsum("kb,kbc->bc", weights, probs(LOGITS, FULL, 2.0))
    np.testing.assert_allclose(target, expected, atol=1e-6)


@pytest.mark.parametrize("spec", ["weighted:weights=0.5;0.5", "weighted:weights=0.2;0.2;0.2;0.4"])
def test_weighted_count_must_match_the_teachers(spec):
    with pytest.raises(UsageError, match=r"weighted: got \d weights for 3 teachers"):
        combine(spec)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("weighted", "option weights is required"),
        ("weighted:weights=0.5;-0.5", "weights must be >= 0"),
        ("weighted:weights=0;0", "must not all be 0"),
        ("weighted:weights=a;b", "option weights='a;b' must be a list of float or none"),
        ("mean,T=2", "unknown option 'T'"),
    ],
)
def test_bad_combiner_options(spec, message):
    with pytest.raises(UsageError, match=message):
        create("combiners", spec)


def test_entropy_weights_follow_ebkd():
    weights, target = combine("entropy", T=4.0)
    expected = entropy_weights(probs(LOGITS, FULL))  # from temperature-1 probabilities
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    np.testing.assert_allclose(target, mix(expected, probs(LOGITS, FULL, 4.0), FULL), atol=1e-6)


def test_ca_mkd_weights_from_cross_entropy_and_entropy_when_unlabeled():
    weights, target = combine("ca-mkd", T=2.0)
    p = probs(LOGITS, FULL)
    by_entropy = entropy_weights(p)
    for b, y in enumerate(LABELS):
        if y < 0:
            np.testing.assert_allclose(weights[:, b], by_entropy[:, b], atol=1e-6)
        else:
            L = np.array([-math.log(p[k, b, y]) for k in range(3)])
            expected = (1 - np.exp(L) / np.exp(L).sum()) / 2
            np.testing.assert_allclose(weights[:, b], expected, atol=1e-6)
    np.testing.assert_allclose(target, mix(weights, probs(LOGITS, FULL, 2.0), FULL), atol=1e-6)


def test_best_puts_all_weight_on_the_most_confident_teacher():
    weights, target = combine("best", T=2.0)
    p = probs(LOGITS, FULL)
    for b in range(3):
        top = int(np.argmax([p[k, b].max() for k in range(3)]))
        np.testing.assert_array_equal(weights[:, b], np.eye(3)[top])
        np.testing.assert_allclose(target[b], softmax(LOGITS[top, b] / 2.0), atol=1e-6)


@pytest.mark.parametrize("spec", ["mean", "weighted:weights=0.2;0.3;0.5", "entropy", "ca-mkd"])
def test_teacher_lacking_a_class_abstains_on_it(spec):
    known = FULL.copy()
    known[1, 3] = False  # teacher 1 does not know class 3; its logit there is garbage
    logits = LOGITS.copy()
    logits[1, :, 3] = 50.0
    weights, target = combine(spec, logits=logits, known=known, T=2.0)
    p1 = probs(logits, known)
    assert p1[1, :, 3].sum() == 0 and np.allclose(p1.sum(-1), 1)
    np.testing.assert_allclose(weights.sum(0), 1, atol=1e-6)
    np.testing.assert_allclose(target, mix(weights, probs(logits, known, 2.0), known), atol=1e-6)


def test_mean_logits_with_a_teacher_lacking_a_class():
    known = FULL.copy()
    known[0, 2] = False
    logits = LOGITS.copy()
    logits[0, :, 2] = IMPOSSIBLE
    _, target = combine("mean-logits", logits=logits, known=known, T=2.0)
    for b in range(3):
        mean = np.zeros(4)
        for c in range(4):
            teachers = [k for k in range(3) if known[k, c]]
            mean[c] = np.mean([math.log(probs(logits, known)[k, b, c]) for k in teachers])
        np.testing.assert_allclose(target[b], softmax(mean / 2.0), atol=1e-6)


def test_ca_mkd_ignores_a_teacher_that_lacks_the_label_class():
    known = FULL.copy()
    known[2, 0] = False  # row 0 is labeled 0
    weights, _ = combine("ca-mkd", known=known)
    np.testing.assert_allclose(weights[:, 0], [0.5, 0.5, 0.0], atol=1e-6)


def test_best_ignores_classes_a_teacher_does_not_know():
    known = FULL.copy()
    known[2, 1] = False  # teacher 2's confident class on row 0
    logits = LOGITS.copy()
    logits[2, 0] = [0.0, 9.0, 0.0, 0.0]
    weights, _ = combine("best", logits=logits, known=known)
    assert weights[:, 0].argmax() != 2


def test_class_no_teacher_knows_gets_no_mass():
    known = FULL.copy()
    known[:, 1] = False
    for spec in ("mean", "mean-logits", "entropy", "best"):
        _, target = combine(spec, known=known, T=2.0)
        np.testing.assert_allclose(target[:, 1], 0, atol=1e-12)
        np.testing.assert_allclose(target.sum(-1), 1, atol=1e-6)


@pytest.mark.parametrize(
    "spec", ["mean", "mean-logits", "weighted:weights=3", "entropy", "ca-mkd", "best"]
)
def test_one_teacher_gives_its_own_distribution(spec):
    weights, target = combine(spec, logits=LOGITS[:1], known=FULL[:1], T=3.0)
    np.testing.assert_allclose(weights, np.ones((1, 3)), atol=1e-7)
    np.testing.assert_allclose(target, probs(LOGITS[:1], FULL[:1], 3.0)[0], atol=1e-6)


@pytest.mark.parametrize("spec", ["entropy", "ca-mkd", "best"])
def test_weights_do_not_depend_on_the_temperature(spec):
    np.testing.assert_allclose(combine(spec, T=1.0)[0], combine(spec, T=5.0)[0], atol=1e-7)
