"""dawid-skene's default: the EM over the teachers' probabilities (``soft=true``), checked
against an independent loop computation on hand-made tensors, and why it is the default."""

import numpy as np
import torch

from kdplug.plugins import create


def run(spec: str, probs: torch.Tensor):
    known = torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool)
    return create("label-generators", spec)(probs.mean(0), probs, known)


def soft_em_by_hand(p: np.ndarray, smoothing: float, steps: int) -> tuple[np.ndarray, list]:
    """The soft EM written out with loops: start from the vote shares and the votes' counts;
    each step takes the M-step, the E-step on the evidence ``p / mean p`` and the expected
    counts. Returns the posteriors and each teacher's mean posterior of its vote."""
    K, N, C = p.shape
    votes = p.argmax(2)
    rho = p.mean(1)  # [K, C]
    q = np.zeros((N, C))
    counts = np.zeros((K, C, C))
    for k in range(K):
        for i in range(N):
            q[i, votes[k, i]] += 1 / K
    for k in range(K):
        for i in range(N):
            counts[k, :, votes[k, i]] += q[i]
    for _ in range(steps):
        pi = q.mean(0)
        theta = (counts + smoothing) / (counts + smoothing).sum(2, keepdims=True)
        likelihood = np.zeros((K, N, C))
        for k in range(K):
            for i in range(N):
                for c in range(C):
                    likelihood[k, i, c] = sum(
                        theta[k, c, s] * p[k, i, s] / rho[k, s] for s in range(C)
                    )
        post = pi * likelihood.prod(0)
        q_new = post / post.sum(1, keepdims=True)
        counts = np.zeros((K, C, C))
        for k in range(K):
            for i in range(N):
                for c in range(C):
                    for s in range(C):
                        share = theta[k, c, s] * p[k, i, s] / rho[k, s] / likelihood[k, i, c]
                        counts[k, c, s] += q_new[i, c] * share
        q = q_new
    accuracy = [float(np.mean([q[i, votes[k, i]] for i in range(N)])) for k in range(K)]
    return q, accuracy


HAND_MADE = np.array(
    [
        [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]],
        [[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]],
        [[0.9, 0.05, 0.05], [0.3, 0.4, 0.3], [0.1, 0.1, 0.8], [0.25, 0.5, 0.25], [0.2, 0.2, 0.6]],
    ]
)


def test_soft_dawid_skene_matches_a_loop_computation_on_hand_made_tensors():
    probs = torch.tensor(HAND_MADE, dtype=torch.float32)
    for steps in (1, 2, 3):
        out = run(f"dawid-skene,max_iter={steps},smoothing=0.5", probs)
        expected, accuracy = soft_em_by_hand(HAND_MADE, 0.5, steps)
        np.testing.assert_allclose(out.probs.numpy(), expected, atol=1e-5)
        assert out.label.tolist() == expected.argmax(1).tolist()
        np.testing.assert_allclose(out.info["teacher_accuracy"], accuracy, atol=1e-6)


def test_the_default_is_soft_and_one_hot_probabilities_are_the_classic_votes():
    probs = torch.tensor(HAND_MADE, dtype=torch.float32)
    default = run("dawid-skene", probs)
    np.testing.assert_allclose(default.probs, run("dawid-skene,soft=true", probs).probs)
    assert not np.allclose(default.probs, run("dawid-skene,soft=false", probs).probs)
    one_hot = torch.nn.functional.one_hot(probs.argmax(2), 3).float()
    np.testing.assert_allclose(
        run("dawid-skene", one_hot).probs, run("dawid-skene,soft=false", one_hot).probs, atol=1e-6
    )


def test_the_default_uses_how_sure_each_teacher_is_where_votes_cannot():
    """Three teachers, each right on 70% of the rows: sure (0.9) where right, unsure where
    wrong. The votes lose that; the mean and the default keep it."""
    rng = np.random.default_rng(0)
    C, N = 4, 1200
    truth = rng.integers(0, C, N)
    probs = []
    for _ in range(3):
        right = rng.random(N) < 0.7
        wrong = (truth + rng.integers(1, C, N)) % C
        p = np.full((N, C), 0.1 / (C - 1))
        p[np.arange(N), truth] = np.where(right, 0.9, 0.3)
        p[np.arange(N), wrong] = np.where(right, p[np.arange(N), wrong], 0.4)
        probs.append(p / p.sum(1, keepdims=True))
    probs = torch.tensor(np.stack(probs), dtype=torch.float32)

    def accuracy(label):
        return float((label.numpy() == truth).mean())

    mean = accuracy(probs.mean(0).argmax(1))
    votes = accuracy(run("dawid-skene,soft=false", probs).label)
    default = accuracy(run("dawid-skene", probs).label)
    assert default >= mean - 0.01 and default > votes + 0.03, (default, mean, votes)


def test_the_em_says_each_iteration_and_how_far_the_posteriors_moved(caplog):
    import logging

    probs = torch.tensor(HAND_MADE, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="kdplug.progress"):
        out = run("dawid-skene,max_iter=3,smoothing=0.5", probs)
    lines = [r.getMessage() for r in caplog.records if r.name == "kdplug.progress"]
    assert out.info["iterations"] == 3 and len(lines) == 4  # one per iteration, one at the end
    for step, line in enumerate(lines[:3], 1):
        assert line.startswith(f"dawid-skene EM: iteration {step}/3, change ")
    assert lines[3].startswith("dawid-skene EM: iteration 3/3") and " done in " in lines[3]
