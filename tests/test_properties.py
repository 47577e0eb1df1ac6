"""Hypothesis properties of every registered loss strategy and combiner.

Logits range over [-1e4, 1e4], with all-equal and all-extreme cases drawn on purpose.
"""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kdplug import ops
from kdplug.plugins import get_manager

LOSSES = get_manager().registries["losses"].names()
COMBINERS = get_manager().registries["combiners"].names()
PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)
TEMPERATURES = st.sampled_from([0.5, 1.0, 4.0])


def loss_specs() -> list[str]:
    """Every registered loss with its defaults, plus the standardizing variants."""
    specs = list(LOSSES)
    specs += [f"{name},standardize=true" for name in LOSSES if name in ("kd", "dkd")]
    return specs


def combiner_spec(name: str, K: int) -> str:
    return (
        f"weighted:weights={';'.join(str(k + 1) for k in range(K))}" if name == "weighted" else name
    )


def test_every_shipped_component_is_covered():
    assert {"ce", "kd", "dkd", "dist"} <= set(LOSSES)
    assert {"mean", "mean-logits", "weighted", "entropy", "ca-mkd", "best", "auto"} <= set(
        COMBINERS
    )


FINITE = st.floats(-1e4, 1e4, width=32)
ELEMENT = st.one_of(FINITE, st.sampled_from([-1e4, 0.0, 1e4]))


@st.composite
def logits(draw, shape: tuple[int, ...]) -> np.ndarray:
    """Arbitrary, all-equal or all-extreme float32 logits of ``shape``."""
    mode = draw(st.sampled_from(["any", "equal", "extreme"]))
    if mode == "equal":
        return np.full(shape, draw(ELEMENT), dtype=np.float32)
    elements = st.sampled_from([-1e4, 1e4]) if mode == "extreme" else ELEMENT
    return draw(arrays(np.float32, shape, elements=elements))


@st.composite
def teacher_outputs(draw):
    """(logits [K, B, C], known [K, C] with every teacher knowing a class, labels [B])."""
    K, B, C = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 5))
    z = draw(logits((K, B, C)))
    known = draw(arrays(np.bool_, (K, C)))
    for k in range(K):
        known[k, draw(st.integers(0, C - 1))] = True
    z[~np.broadcast_to(known[:, None, :], z.shape)] = ops.IMPOSSIBLE  # as the teacher set does
    labels = draw(arrays(np.int64, B, elements=st.integers(-1, C - 1)))
    return torch.tensor(z), torch.tensor(known), torch.tensor(labels)


@pytest.mark.parametrize("name", COMBINERS)
@PROPERTY_SETTINGS
@given(outputs=teacher_outputs(), temperature=TEMPERATURES)
def test_combiner_weights_and_target_are_distributions(name, outputs, temperature):
    z, known, labels = outputs
    combiner = get_manager().create("combiners", combiner_spec(name, z.shape[0]))
    weights, target = combiner(z, known, labels, temperature)
    assert weights.shape == z.shape[:2] and target.shape == z.shape[1:]
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(z.shape[1]), atol=1e-5, rtol=0)
    assert torch.isfinite(target).all() and (target >= 0).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(z.shape[1]), atol=1e-5, rtol=0)
    unknown = ~known.any(0)
    assert (target[:, unknown] <= 1e-6).all()


def fitted_auto(spec: str, K: int, C: int):
    """``auto`` fitted on 40 synthetic rows of K teachers (teacher 0 right, the rest noise,
    teacher 1 a probability teacher with exact zeros)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, C, (40,), generator=g)
    z = torch.randn(K, 40, C, generator=g)
    z[0, torch.arange(40), labels] += 3
    z[1, :, 0] = ops.IMPOSSIBLE
    combiner = get_manager().create("combiners", spec)
    combiner.fit(z, torch.ones(K, C, dtype=torch.bool), labels)
    return combiner


FITTED = {spec: fitted_auto(spec, 3, 4) for spec in ("auto,pool=linear", "auto,pool=log")}


@st.composite
def three_teachers_four_classes(draw):
    """(logits [3, B, 4], known [3, 4], labels [B]) for a combiner fitted on that shape."""
    B = draw(st.integers(1, 4))
    z = draw(logits((3, B, 4)))
    known = draw(arrays(np.bool_, (3, 4)))
    for k in range(3):
        known[k, draw(st.integers(0, 3))] = True
    z[~np.broadcast_to(known[:, None, :], z.shape)] = ops.IMPOSSIBLE
    labels = draw(arrays(np.int64, B, elements=st.integers(-1, 3)))
    return torch.tensor(z), torch.tensor(known), torch.tensor(labels)


@pytest.mark.parametrize("spec", list(FITTED))
@PROPERTY_SETTINGS
@given(outputs=three_teachers_four_classes(), temperature=st.sampled_from([0.5, 1.0, 4.0, 1e3]))
def test_fitted_auto_gives_distributions_and_keeps_exact_zeros(spec, outputs, temperature):
    z, known, labels = outputs
    # the distillation target at `temperature`, and the prediction (calibrated teachers)
    for weights, target in (
        FITTED[spec](z, known, labels, temperature),
        FITTED[spec].predict(z, known, labels),
    ):
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        torch.testing.assert_close(weights.sum(0), torch.ones(z.shape[1]), atol=1e-5, rtol=0)
        assert torch.isfinite(target).all() and (target >= 0).all()
        torch.testing.assert_close(target.sum(-1), torch.ones(z.shape[1]), atol=1e-5, rtol=0)
        # a class every teacher rules out (unknown, or probability exactly 0) gets exactly 0,
        # unless a teacher rules out all its classes on that row (then uniform over them)
        ruled_out = ((z <= ops.IMPOSSIBLE) | ~known[:, None, :]).all(0)
        some_mass = ((z > ops.IMPOSSIBLE) & known[:, None, :]).any(-1).all(0)
        assert (target[ruled_out & some_mass[:, None]] == 0).all()


@st.composite
def student_and_teacher(draw):
    """(student logits [B, C], one teacher's logits [B, C], labels [B])."""
    B, C = draw(st.integers(1, 4)), draw(st.integers(2, 5))
    student = draw(logits((B, C)))
    teacher = draw(logits((B, C)))
    labels = draw(arrays(np.int64, B, elements=st.integers(-1, C - 1)))
    return torch.tensor(student), torch.tensor(teacher), torch.tensor(labels)


def target_for(loss, teacher: torch.Tensor) -> torch.Tensor:
    """The target the engine hands the loss for one teacher: its probabilities at the loss's
    temperature, from standardized logits when the loss standardizes."""
    z = ops.standardize(teacher) if loss.standardize else teacher
    return ops.teacher_probs(z, temperature=loss.temperature)


@pytest.mark.parametrize("spec", loss_specs())
@PROPERTY_SETTINGS
@given(batch=student_and_teacher())
def test_loss_is_finite_non_negative_with_finite_gradients(spec, batch):
    student, teacher, labels = batch
    loss = get_manager().create("losses", spec)
    student.requires_grad_(True)
    value = loss(student, target_for(loss, teacher), labels)
    assert value.dim() == 0 and torch.isfinite(value)
    assert value.item() >= -1e-4
    if value.requires_grad:
        value.backward()
        assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("spec", [s for s in loss_specs() if not s.startswith("dist")])
@PROPERTY_SETTINGS
@given(batch=student_and_teacher())
def test_loss_is_zero_when_the_student_is_the_teacher(spec, batch):
    _, teacher, labels = batch
    loss = get_manager().create("losses", spec)
    # a teacher logit at IMPOSSIBLE means probability 0, which standardization leaves out;
    # a student's logits all count, so there the two differ by design
    assume(not loss.standardize or bool((teacher > ops.IMPOSSIBLE / 2).all()))
    value = loss(teacher, target_for(loss, teacher), labels)
    assert abs(value.item()) <= 1e-4


@PROPERTY_SETTINGS
@given(
    z=arrays(
        np.float32,
        st.tuples(st.integers(2, 4), st.integers(2, 5)),
        elements=st.floats(-5, 5, width=32),
    ),
    tau=TEMPERATURES,
)
def test_dist_is_zero_when_the_student_is_the_teacher(z, tau):
    # Pearson correlation is undefined for a constant vector (DIST's eps makes it 0, and
    # ~1 - eps / |centered|^2 for a nearly constant one), so the rows and columns of the
    # probabilities must vary: logits scaled by tau, and assume() the rest
    loss = get_manager().create("losses", f"dist,tau={tau}")
    teacher = torch.tensor(z) * tau
    target = target_for(loss, teacher)
    centered_rows = target - target.mean(1, keepdim=True)
    centered_columns = target - target.mean(0, keepdim=True)
    assume(centered_rows.norm(dim=1).min() > 0.03 and centered_columns.norm(dim=0).min() > 0.03)
    value = loss(teacher, target, torch.full((z.shape[0],), -1)).item()
    assert abs(value) <= tau**2 * 1e-4
