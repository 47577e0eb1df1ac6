"""Label generators on hand-made targets and on synthetic teachers whose truth is known."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdplug import UsageError
from kdplug.plugins import create


def generator(spec: str):
    return create("label-generators", spec)


def all_known(K: int, C: int) -> torch.Tensor:
    return torch.ones(K, C, dtype=torch.bool)


def synthetic_teachers(
    truth: np.ndarray, accuracy: list[float], confidence: list[float], C: int, seed: int = 0
) -> torch.Tensor:
    """``[K, N, C]``: teacher k votes the true class with probability ``accuracy[k]`` (else
    a uniformly random other class) and puts ``confidence[k]`` on its vote."""
    rng = np.random.default_rng(seed)
    N = len(truth)
    probs = []
    for acc, conf in zip(accuracy, confidence):
        wrong = (truth + rng.integers(1, C, N)) % C
        vote = np.where(rng.random(N) < acc, truth, wrong)
        p = np.full((N, C), (1 - conf) / (C - 1))
        p[np.arange(N), vote] = conf
        probs.append(p)
    return torch.tensor(np.stack(probs), dtype=torch.float32)


def accuracy_of(label: torch.Tensor, truth: np.ndarray) -> float:
    return float((label.numpy() == truth).mean())


# -- option validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("threshold,tau=1.5", "threshold: tau must be in [0, 1], got 1.5"),
        ("soft,T=0", "soft: T must be > 0, got 0.0"),
        ("topk,k=0", "topk: k must be >= 1, got 0"),
        ("class-balanced,per_class=3,quantile=0.5", "give per_class or quantile, not both"),
        ("class-balanced,quantile=1.5", "quantile must be in (0, 1], got 1.5"),
        ("adaptive,tau=0.5,min_tau=0.8", "adaptive: min_tau must be <= tau (0.5), got 0.8"),
        ("agreement,min_agree=0", "agreement: min_agree must be >= 1, got 0"),
        ("dawid-skene,max_iter=0", "dawid-skene: max_iter must be >= 1, got 0"),
        ("pate,sigma=-1", "pate: sigma must be > 0, got -1.0"),
        ("pate,sigma1=2", "pate: sigma1 is the noise of the threshold check; give threshold too"),
        ("pate,delta=1", "pate: delta must be in (0, 1), got 1.0"),
        ("treshold", "did you mean 'threshold'?"),
    ],
)
def test_bad_options_are_usage_errors(spec, message):
    with pytest.raises(UsageError) as err:
        generator(spec)
    assert message in str(err.value)


def test_agreement_needs_enough_teachers():
    probs = torch.softmax(torch.randn(2, 4, 3), -1)
    with pytest.raises(UsageError, match="agreement: min_agree=3 but the run has 2 teachers"):
        generator("agreement,min_agree=3")(probs.mean(0), probs, all_known(2, 3))


# -- hand-made targets --------------------------------------------------------------------

TARGET = torch.tensor(
    [
        [0.97, 0.02, 0.01],
        [0.60, 0.30, 0.10],
        [0.10, 0.80, 0.10],
        [0.05, 0.05, 0.90],
        [0.34, 0.33, 0.33],
    ]
)


def test_threshold_accepts_rows_at_or_above_tau():
    out = generator("threshold,tau=0.8")(TARGET, TARGET[None], all_known(1, 3))
    assert out.label.tolist() == [0, -1, 1, 2, -1]
    assert out.accepted.tolist() == [True, False, True, True, False]
    assert torch.equal(out.probs, TARGET)


def test_soft_sharpens_and_keeps_every_row():
    out = generator("soft,T=0.5")(TARGET, TARGET[None], all_known(1, 3))
    expected = TARGET**2 / (TARGET**2).sum(1, keepdim=True)
    assert torch.allclose(out.probs, expected, atol=1e-6)
    assert out.accepted.all()
    assert out.label.tolist() == TARGET.argmax(1).tolist()


def test_topk_keeps_k_classes_renormalized():
    target = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    out = generator("topk,k=2")(target, target[None], all_known(1, 3))
    expected = torch.tensor([[0.625, 0.375, 0.0], [0.5, 0.0, 0.5]])
    # row 2 has a tie between classes 0 and 1; either kept class is right
    assert torch.allclose(out.probs[0], expected[0])
    assert out.probs[1, 2] == pytest.approx(0.8 / 0.9) and (out.probs[1] > 0).sum() == 2
    assert out.accepted.all() and out.label.tolist() == [0, 2]


def class_target(rows: list[tuple[int, float]], C: int = 3) -> torch.Tensor:
    """Rows with class c at confidence p, the rest spread evenly."""
    target = torch.zeros(len(rows), C)
    for i, (c, p) in enumerate(rows):
        target[i] = (1 - p) / (C - 1)
        target[i, c] = p
    return target


# four classes; row 4 (confidence 0.28) is below the default min_confidence 0.3
BALANCE_ROWS = [(0, 0.9), (0, 0.5), (0, 0.7), (0, 0.8), (0, 0.28), (1, 0.6), (2, 0.35), (2, 0.95)]


@pytest.mark.parametrize(
    "spec, accepted",
    [
        ("class-balanced,per_class=2", [0, 3, 5, 6, 7]),
        ("class-balanced,quantile=0.5", [0, 3, 5, 7]),  # ceil(0.5 * [4, 1, 2, 0])
        ("class-balanced", [0, 5, 7]),  # every class as large as the smallest (1 row)
        ("class-balanced,per_class=9,min_confidence=0.65", [0, 2, 3, 7]),
    ],
)
def test_class_balanced_keeps_the_most_confident_rows_of_each_class(spec, accepted):
    target = class_target(BALANCE_ROWS, C=4)
    out = generator(spec)(target, target[None], all_known(1, 4))
    assert out.accepted.nonzero().flatten().tolist() == accepted
    assert out.label[out.accepted].tolist() == [BALANCE_ROWS[i][0] for i in accepted]


def test_adaptive_lowers_thresholds_of_hard_classes_as_flexmatch():
    tau = 0.9
    # above tau: four rows of class 0, two of class 1, none of class 2
    rows = [(0, 0.95)] * 4 + [(1, 0.92)] * 2 + [(1, 0.5), (1, 0.2), (2, 0.45), (2, 0.3), (0, 0.5)]
    target = class_target(rows)
    sigma = np.array([4, 2, 0])
    beta = sigma / sigma.max()
    flex = beta / (2 - beta) * tau  # [0.9, 0.3, 0.0]
    expected = np.maximum(flex, 0.4)
    out = generator("adaptive,tau=0.9,min_tau=0.4")(target, target[None], all_known(1, 3))
    assert np.allclose(out.info["thresholds"], expected)
    conf = np.array([p for _, p in rows])
    cls = np.array([c for c, _ in rows])
    assert out.accepted.tolist() == (conf >= expected[cls]).tolist()
    assert out.accepted.tolist()[6:] == [True, False, True, False, False]


def test_adaptive_warmup_counts_the_unused_rows():
    rows = [(0, 0.99)] * 2 + [(1, 0.99)] + [(2, 0.4)] * 5
    target = class_target(rows)
    out = generator("adaptive,tau=0.9,min_tau=0.0,warmup=true")(
        target, target[None], all_known(1, 3)
    )
    beta = np.array([2, 1, 0]) / max(2, 5)  # five rows at or below tau
    assert np.allclose(out.info["thresholds"], beta / (2 - beta) * 0.9)


def test_agreement_counts_teachers_voting_the_label():
    # three teachers' argmax per row; the mean target's argmax is the majority
    votes = torch.tensor([[0, 1, 2, 0], [0, 1, 1, 1], [0, 2, 1, 2]])
    probs = torch.nn.functional.one_hot(votes, 3).float() * 0.8 + 0.2 / 3
    target = probs.mean(0)
    out = generator("agreement,min_agree=2")(target, probs, all_known(3, 3))
    assert out.accepted.tolist() == [True, True, True, False]
    assert out.label.tolist() == [0, 1, 1, -1]
    out3 = generator("agreement,min_agree=3")(target, probs, all_known(3, 3))
    assert out3.accepted.tolist() == [True, False, False, False]


# -- Dawid-Skene --------------------------------------------------------------------------


def dawid_skene_one_step(votes: np.ndarray, C: int, smoothing: float) -> np.ndarray:
    """Independent loop-based Dawid-Skene: init from the mean vote, one M-step, one E-step."""
    K, N = votes.shape
    q = np.zeros((N, C))
    for k in range(K):
        for i in range(N):
            q[i, votes[k, i]] += 1 / K
    pi = q.mean(0)
    theta = np.full((K, C, C), smoothing)
    for k in range(K):
        for i in range(N):
            theta[k, :, votes[k, i]] += q[i]
    theta /= theta.sum(2, keepdims=True)
    log_q = np.tile(np.log(pi), (N, 1))
    for i in range(N):
        for k in range(K):
            log_q[i] += np.log(theta[k, :, votes[k, i]])
    post = np.exp(log_q - log_q.max(1, keepdims=True))
    return post / post.sum(1, keepdims=True)


def test_dawid_skene_one_step_matches_a_loop_implementation():
    votes = np.array([[0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 1, 2], [1, 1, 2, 0, 0, 0]])
    probs = torch.nn.functional.one_hot(torch.tensor(votes), 3).float() * 0.7 + 0.1
    spec = "dawid-skene,soft=false,init=vote,max_iter=1,smoothing=0.5"
    out = generator(spec)(probs.mean(0), probs, all_known(3, 3))
    expected = dawid_skene_one_step(votes, 3, 0.5)
    assert np.allclose(out.probs.numpy(), expected, atol=1e-5)
    assert out.label.tolist() == expected.argmax(1).tolist()


@pytest.mark.parametrize("soft", [False, True])
def test_dawid_skene_beats_mean_when_one_teacher_is_much_worse(soft):
    C, N = 5, 1500
    truth = np.random.default_rng(1).integers(0, C, N)
    good = synthetic_teachers(truth, [0.7, 0.7], [0.55, 0.55], C, seed=2)
    # the bad teacher is confidently wrong: it says (c + 1) mod C for 85% of the rows
    bad_vote = np.where(np.random.default_rng(3).random(N) < 0.85, (truth + 1) % C, truth)
    bad = torch.full((1, N, C), 0.01 / (C - 1))
    bad[0, np.arange(N), bad_vote] = 0.99
    probs = torch.cat([good, bad])
    target = probs.mean(0)
    mean_accuracy = accuracy_of(target.argmax(1), truth)
    out = generator(f"dawid-skene,soft={str(soft).lower()}")(target, probs, all_known(3, C))
    ds_accuracy = accuracy_of(out.label, truth)
    assert ds_accuracy > mean_accuracy + 0.15, (ds_accuracy, mean_accuracy)
    estimated = out.info["teacher_accuracy"]
    assert estimated[2] < 0.2 < 0.3 < min(estimated[:2])
    if not soft:  # hard votes: the estimate is each teacher's argmax accuracy
        true_accuracy = [float((p.argmax(1).numpy() == truth).mean()) for p in probs]
        assert np.allclose(estimated, true_accuracy, atol=0.03), (estimated, true_accuracy)


def test_dawid_skene_ignores_classes_a_teacher_cannot_say():
    truth = np.random.default_rng(4).integers(0, 3, 300)
    probs = synthetic_teachers(truth, [0.9, 0.9], [0.8, 0.8], 3, seed=5)
    known = all_known(2, 3)
    known[1, 2] = False  # teacher 1 knows only classes 0 and 1
    probs[1, :, 2] = 0
    probs[1] /= probs[1].sum(1, keepdim=True)
    out = generator("dawid-skene")(probs.mean(0), probs, known)
    assert torch.isfinite(out.probs).all()
    assert accuracy_of(out.label, truth) > 0.85


# -- PATE ---------------------------------------------------------------------------------


def brute_force_epsilon(rdp_slope: float, delta: float) -> float:
    """min over a fine grid of orders of RDP(lam) + log(1/delta) / (lam - 1)."""
    orders = np.concatenate([1 + np.logspace(-4, 4, 400_001)])
    return float(np.min(rdp_slope * orders + math.log(1 / delta) / (orders - 1)))


def vote_probs(votes: np.ndarray, C: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(votes), C).float() * 0.9 + 0.1 / C


def test_pate_epsilon_matches_the_gaussian_rdp_bound():
    votes = np.random.default_rng(6).integers(0, 4, (20, 50))  # 20 teachers, 50 queries
    probs = vote_probs(votes, 4)
    out = generator("pate,sigma=8,delta=1e-6")(probs.mean(0), probs, all_known(20, 4))
    slope = 50 / 8**2  # every query answered: lam / sigma^2 each
    assert out.info["answered"] == 50
    assert out.info["epsilon"] == pytest.approx(brute_force_epsilon(slope, 1e-6), rel=1e-5)
    closed = slope + 2 * math.sqrt(slope * math.log(1e6))
    assert out.info["epsilon"] == pytest.approx(closed, rel=1e-12)


def test_pate_threshold_check_costs_every_query():
    votes = np.zeros((10, 30), dtype=np.int64)
    votes[:, 15:] = np.arange(10)[:, None] % 5  # rows 15+ split 2 votes per class
    probs = vote_probs(votes, 5)
    out = generator("pate,sigma=1e-4,threshold=6,sigma1=1e-4")(
        probs.mean(0), probs, all_known(10, 5)
    )
    assert out.accepted.tolist() == [True] * 15 + [False] * 15  # max votes 10 vs 2
    assert out.label.tolist() == [0] * 15 + [-1] * 15
    assert torch.equal(out.probs[15:], torch.full((15, 5), 0.2))
    slope = 15 / 1e-4**2 + 30 / (2 * 1e-4**2)
    assert out.info["epsilon"] == pytest.approx(slope + 2 * math.sqrt(slope * math.log(1e5)))


def test_pate_noise_is_seeded_and_changes_close_votes():
    votes = np.random.default_rng(7).integers(0, 3, (5, 400))
    probs = vote_probs(votes, 3)
    first = generator("pate,sigma=3,seed=1")(probs.mean(0), probs, all_known(5, 3))
    again = generator("pate,sigma=3,seed=1")(probs.mean(0), probs, all_known(5, 3))
    other = generator("pate,sigma=3,seed=2")(probs.mean(0), probs, all_known(5, 3))
    assert torch.equal(first.label, again.label)
    assert not torch.equal(first.label, other.label)
    assert first.info["noise_changed_votes"] > 0
    assert torch.equal(first.probs, torch.nn.functional.one_hot(first.label, 3).float())


def test_pate_with_tiny_noise_is_the_majority_vote():
    truth = np.random.default_rng(8).integers(0, 4, 200)
    probs = synthetic_teachers(truth, [0.8] * 7, [0.9] * 7, 4, seed=9)
    out = generator("pate,sigma=1e-6")(probs.mean(0), probs, all_known(7, 4))
    counts = torch.nn.functional.one_hot(probs.argmax(-1), 4).sum(0)
    top2 = counts.topk(2, dim=1).values
    clear = top2[:, 0] > top2[:, 1]  # ties are broken by the noise
    assert clear.sum() > 150
    assert torch.equal(out.label[clear], counts.argmax(1)[clear])


# -- properties ---------------------------------------------------------------------------


@st.composite
def teacher_outputs(draw):
    K = draw(st.integers(1, 4))
    N = draw(st.integers(1, 25))
    C = draw(st.integers(2, 5))
    scale = draw(st.sampled_from([0.0, 1.0, 5.0, 1e4]))
    seed = draw(st.integers(0, 2**16))
    logits = torch.randn(K, N, C, generator=torch.Generator().manual_seed(seed)) * scale
    probs = torch.softmax(logits, -1)
    return probs.mean(0), probs


THRESHOLDED = [
    ("threshold,tau=0.6", lambda out, t, p: t.max(1).values >= 0.6),
    ("class-balanced,per_class=2,min_confidence=0.5", lambda out, t, p: t.max(1).values >= 0.5),
    (
        "adaptive,tau=0.8,min_tau=0.3",
        lambda out, t, p: (
            t.max(1).values
            >= torch.tensor(out.info["thresholds"], dtype=torch.float32)[t.argmax(1)]
        ),
    ),
    ("dawid-skene,tau=0.7", lambda out, t, p: out.probs.max(1).values >= 0.7),
    (
        "agreement,min_agree=1",
        lambda out, t, p: (p.argmax(-1) == t.argmax(1)).sum(0) >= 1,
    ),
    (
        "pate,sigma=0.5,threshold=2,sigma1=1e-6",
        lambda out, t, p: (
            torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).sum(0).max(1).values >= 2 - 1e-3
        ),
    ),
]


@pytest.mark.parametrize("spec, allowed", THRESHOLDED, ids=[s for s, _ in THRESHOLDED])
@settings(max_examples=40, deadline=None)
@given(data=teacher_outputs())
def test_generators_never_accept_a_row_below_their_threshold(spec, allowed, data):
    target, probs = data
    K, N, C = probs.shape
    out = generator(spec)(target, probs, all_known(K, C))
    assert not (out.accepted & ~allowed(out, target, probs)).any()
    assert torch.equal(out.label >= 0, out.accepted)
    assert torch.isfinite(out.probs).all()
    assert torch.allclose(out.probs.sum(1), torch.ones(N), atol=1e-4)
    assert ((out.label >= -1) & (out.label < C)).all()
