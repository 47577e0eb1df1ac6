"""Loss strategies against independent numpy computations on small hand-made tensors."""

import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from kdplug import UsageError
from kdplug.plugins import create

STUDENT = np.array([[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, -2.0, 1.5], [-1.0, 3.0, 0.0, 0.5]])
TEACHER = np.array([[3.0, 0.0, 1.0, -1.0], [0.0, 0.5, -1.0, 2.5], [0.5, 1.0, 2.0, -0.5]])
LABELS = np.array([0, 3, -1])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def zscore(z: np.ndarray) -> np.ndarray:
    """The z-score of the logit-standardization authors' code: torch.std, so n - 1."""
    return (z - z.mean(-1, keepdims=True)) / z.std(-1, ddof=1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) for one distribution; terms with p = 0 are 0."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def loss_value(spec: str, student: np.ndarray, target: np.ndarray, labels: np.ndarray):
    loss = create("losses", spec)
    value = loss(
        torch.tensor(student, dtype=torch.float32), torch.tensor(target), torch.tensor(labels)
    )
    return loss, value.item()


def hinton(student: np.ndarray, target: np.ndarray, T: float) -> float:
    q = softmax(student / T)
    return T**2 * np.mean([kl(t, qi) for t, qi in zip(target, q)])


def dkd_reference(student, teacher_probs, labels, T, alpha, beta) -> float:
    """DKD row by row: binary target/rest KL plus the KL over the other classes."""
    total = 0.0
    q_all = softmax(student / T)
    for s, q, p, y in zip(student, q_all, teacher_probs, labels):
        y = int(np.argmax(p)) if y < 0 else int(y)
        tckd = kl([p[y], 1 - p[y]], [q[y], 1 - q[y]])
        rest = [c for c in range(len(p)) if c != y]
        p_hat = p[rest] / p[rest].sum()
        q_hat = softmax(s[rest] / T)
        total += alpha * tckd + beta * kl(p_hat, q_hat)
    return T**2 * total / len(student)


def pearson_mean(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]))


def test_defaults_and_contract_attributes():
    kd = create("losses", "kd")
    assert (kd.temperature, kd.standardize, kd.uses_teachers) == (2.0, False, True)
    assert (kd.ce_weight, kd.kd_weight) == (0.1, 0.9)
    dkd = create("losses", "dkd")
    assert (dkd.alpha, dkd.beta, dkd.temperature, dkd.warmup) == (1.0, 8.0, 2.0, 20)
    assert (dkd.ce_weight, dkd.kd_weight) == (1.0, 1.0)
    dist = create("losses", "dist")
    assert (dist.beta, dist.gamma, dist.temperature, dist.ce_weight, dist.kd_weight) == (
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
    )
    ce = create("losses", "ce")
    assert ce.uses_teachers is False and ce.ce_weight == 1.0 and ce.kd_weight == 0.0


def test_ce_distillation_part_is_zero():
    _, value = loss_value("ce", STUDENT, softmax(TEACHER), LABELS)
    assert value == 0.0


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_hinton_formula(T):
    target = softmax(TEACHER / T)
    _, value = loss_value(f"kd,T={T}", STUDENT, target, LABELS)
    assert value == pytest.approx(hinton(STUDENT, target, T), rel=1e-5)


def test_kd_target_with_a_zero_probability_class():
    # a teacher that lacks class 2 (label alignment): its probability there is exactly 0
    target = np.array([[0.7, 0.3, 0.0, 0.0], [0.1, 0.2, 0.0, 0.7], [0.25, 0.25, 0.0, 0.5]])
    _, value = loss_value("kd", STUDENT, target, LABELS)
    assert math.isfinite(value)
    assert value == pytest.approx(hinton(STUDENT, target, 2.0), rel=1e-5)


def test_kd_gradient_is_T_times_q_minus_target():
    T = 2.0
    student = torch.tensor(STUDENT, dtype=torch.float32, requires_grad=True)
    target = softmax(TEACHER / T)
    create("losses", f"kd,T={T}")(student, torch.tensor(target), torch.tensor(LABELS)).backward()
    expected = T * (softmax(STUDENT / T) - target) / len(STUDENT)
    np.testing.assert_allclose(student.grad.numpy(), expected, atol=1e-6)


def test_kd_standardize_zscores_the_student():
    T = 2.0
    target = softmax(zscore(TEACHER) / T)
    _, value = loss_value(f"kd,T={T},standardize=true", STUDENT, target, LABELS)
    assert value == pytest.approx(hinton(zscore(STUDENT), target, T), rel=1e-4)
    _, plain = loss_value(f"kd,T={T}", STUDENT, target, LABELS)
    assert abs(plain - value) > 1e-3


def test_kd_is_zero_when_student_matches_target():
    target = softmax(STUDENT / 4.0)
    _, value = loss_value("kd,T=4", STUDENT, target, LABELS)
    assert value == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_decoupled_formula(alpha, beta, T):
    target = softmax(TEACHER / T)
    loss, value = loss_value(
        f"dkd,alpha={alpha},beta={beta},T={T},warmup=0", STUDENT, target, LABELS
    )
    assert value == pytest.approx(dkd_reference(STUDENT, target, LABELS, T, alpha, beta), rel=1e-4)


def test_dkd_parts_recompose_kd():
    # the paper's decomposition, row by row: KD = TCKD + (1 - p_t[y]) * NCKD
    T = 1.0
    target = softmax(TEACHER / T)
    labels = np.array([0, 3, 2])
    tckd_only = create("losses", "dkd,alpha=1,beta=0,T=1,warmup=0")
    nckd_only = create("losses", "dkd,alpha=0,beta=1,T=1,warmup=0")
    kd = create("losses", "kd,T=1")
    for row in range(len(STUDENT)):
        s = torch.tensor(STUDENT[row : row + 1], dtype=torch.float32)
        t = torch.tensor(target[row : row + 1])
        y = torch.tensor(labels[row : row + 1])
        p_y = target[row, labels[row]]
        combined = tckd_only(s, t, y).item() + (1 - p_y) * nckd_only(s, t, y).item()
        assert combined == pytest.approx(kd(s, t, y).item(), rel=1e-4)


def test_dkd_unlabeled_rows_use_the_target_argmax():
    target = softmax(TEACHER / 4.0)
    unlabeled = np.full(3, -1)
    argmax = target.argmax(-1)
    _, by_argmax = loss_value("dkd,warmup=0", STUDENT, target, argmax)
    _, value = loss_value("dkd,warmup=0", STUDENT, target, unlabeled)
    assert value == pytest.approx(by_argmax, rel=1e-6)
    _, other_label = loss_value("dkd,warmup=0", STUDENT, target, (argmax + 1) % 4)
    assert abs(other_label - value) > 1e-3


def test_dkd_warmup_is_linear_over_epochs():
    target = torch.tensor(softmax(TEACHER / 4.0))
    student = torch.tensor(STUDENT, dtype=torch.float32)
    labels = torch.tensor(LABELS)
    full = create("losses", "dkd,warmup=0")(student, target, labels).item()
    loss = create("losses", "dkd,warmup=10")
    seen = []
    for epoch in (0, 4, 9, 15):
        loss.set_epoch(epoch, 20)
        seen.append(loss(student, target, labels).item() / full)
    assert seen == pytest.approx([0.1, 0.5, 1.0, 1.0], rel=1e-5)


def test_dkd_standardize_zscores_the_student():
    T = 2.0
    target = softmax(zscore(TEACHER) / T)
    _, value = loss_value(f"dkd,T={T},standardize=true,warmup=0", STUDENT, target, LABELS)
    expected = dkd_reference(zscore(STUDENT), target, LABELS, T, 1.0, 8.0)
    assert value == pytest.approx(expected, rel=1e-4)


def test_dkd_nckd_is_exact_for_a_confident_teacher():
    # teacher [75, 0, 0] at T = 1 leaves ~2.7e-33 outside class 0; NCKD renormalizes it to
    # [0.5, 0.5] exactly (a 1e-30 floor on that mass once gave -0.0183 here)
    target = softmax(np.array([[75.0, 0.0, 0.0]]))
    student = np.array([[0.0, 0.0, 5.0]])
    _, value = loss_value("dkd,alpha=0,beta=1,T=1,warmup=0", student, target, np.array([0]))
    expected = kl([0.5, 0.5], softmax(np.array([0.0, 5.0])))
    assert expected == pytest.approx(1.8136, abs=1e-4)
    assert value == pytest.approx(expected, rel=1e-5)
    s = torch.tensor(student, dtype=torch.float32, requires_grad=True)
    loss = create("losses", "dkd,alpha=0,beta=1,T=1,warmup=0")
    loss(s, torch.tensor(target), torch.tensor([0])).backward()
    q_rest = softmax(np.array([0.0, 5.0]))  # d NCKD / d z_rest = q_hat - p_hat
    np.testing.assert_allclose(s.grad.numpy()[0, 1:], q_rest - 0.5, atol=1e-5)


@pytest.mark.parametrize("spec", ["kd,T=1,standardize=true", "dkd,T=1,standardize=true,warmup=0"])
def test_standardize_takes_every_student_logit_however_low(spec):
    # only teachers' logits at IMPOSSIBLE mean "probability 0"; a student logit of -6000 is
    # an ordinary logit, and standardization makes the loss independent of the scale
    target = softmax(zscore(np.array([[2.0, 1.0, 0.0]])))
    student = np.array([[0.0, 1.0, -6000.0]])
    _, value = loss_value(spec, student, target, np.array([0]))
    _, scaled = loss_value(spec, student / 1000, target, np.array([0]))
    assert value == pytest.approx(scaled, rel=1e-4)
    if spec.startswith("kd"):
        assert value == pytest.approx(hinton(zscore(student), target, 1.0), rel=1e-4)


def test_dkd_target_lacking_the_label_class_is_finite():
    target = np.array([[0.0, 0.6, 0.4, 0.0], [0.2, 0.3, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    labels = np.array([0, 3, -1])  # rows 0-1: p_t[y] = 0; row 2: no mass outside y
    _, value = loss_value("dkd,T=4,warmup=0", STUDENT, target, labels)
    q = softmax(STUDENT / 4.0)
    expected = 0.0
    for row, y in ((0, 0), (1, 3)):
        p, rest = target[row], [c for c in range(4) if c != y]
        expected += kl([0.0, 1.0], [q[row, y], 1 - q[row, y]])
        expected += 8 * kl(p[rest], softmax(STUDENT[row, rest] / 4.0))
    expected += kl([1.0, 0.0], [q[2, 0], 1 - q[2, 0]])  # NCKD is 0 without other mass
    assert value == pytest.approx(16 * expected / 3, rel=1e-4)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 2.0)])
def test_dist_matches_pearson_terms(beta, gamma, tau):
    target = softmax(TEACHER / tau)
    _, value = loss_value(f"dist,beta={beta},gamma={gamma},tau={tau}", STUDENT, target, LABELS)
    student = softmax(STUDENT / tau)
    inter = 1 - pearson_mean(student, target)
    intra = 1 - pearson_mean(student.T, target.T)
    assert value == pytest.approx(tau**2 * (beta * inter + gamma * intra), rel=1e-4)


@pytest.mark.parametrize("spec", ["kd", "kd,standardize=true", "dkd,warmup=0", "dist"])
def test_gradients_reach_the_student(spec):
    student = torch.tensor(STUDENT, dtype=torch.float32, requires_grad=True)
    target = torch.tensor(softmax(TEACHER / 4.0))
    create("losses", spec)(student, target, torch.tensor(LABELS)).backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "spec,message",
    [
        ("kd,T=-1", "kd: T must be > 0, got -1"),
        ("kd,T=0", "kd: T must be > 0"),
        ("kd,ce_weight=-0.5", "kd: ce_weight must be >= 0"),
        ("kd,ce_weight=0,kd_weight=0", "cannot both be 0"),
        ("dkd,alpha=-1", "dkd: alpha must be >= 0"),
        ("dkd,beta=-2", "dkd: beta must be >= 0"),
        ("dkd,warmup=-1", "dkd: warmup must be an integer >= 0"),
        ("dkd,warmup=2.5", "dkd: option warmup='2.5' must be int"),
        ("dkd,kd_weight=-1", "dkd: kd_weight must be >= 0"),
        ("dist,tau=0", "dist: tau must be > 0"),
        ("dist,gamma=-1", "dist: gamma must be >= 0"),
        ("ce,ce_weight=0", "ce: ce_weight must be > 0"),
        ("kd,standardize=2", "must be true or false"),
        ("kd,tau=2", "unknown option 'tau'"),
        ("dist,standardize=true", "unknown option 'standardize'"),
    ],
)
def test_bad_options_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        create("losses", spec)


# -- the docs: every spec in their shell examples builds, every Python example runs --------
DOCS = Path(__file__).resolve().parents[1] / "docs"


def code_blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["losses.md", "combiners.md"])
def test_doc_examples_use_valid_specs(page):
    commands = [block.replace("\\\n", " ") for block in code_blocks(page, "bash")]
    assert commands
    for command in commands:
        args = shlex.split(command)
        teachers = args.count("--teacher")
        for flag, value in zip(args, args[1:]):
            if flag == "--loss":
                create("losses", value)
            elif flag == "--combiner":
                logits = torch.randn(teachers, 2, 3)
                known = torch.ones(teachers, 3, dtype=torch.bool)
                create("combiners", value)(logits, known, torch.tensor([0, -1]), 1.0)


@pytest.mark.parametrize("page", ["losses.md", "combiners.md"])
def test_doc_python_examples_run(page):
    blocks = code_blocks(page, "python")
    assert blocks
    for block in blocks:
        exec(compile(block, page, "exec"), {})
