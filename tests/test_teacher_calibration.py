"""Temperature scaling: the fitted T, its effect on ECE, the argmax property, the file."""

import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kdplug import UsageError, metrics
from kdplug.calibration import T_MAX, T_MIN, apply_temperature, fit_temperature, load_temperatures
from kdplug.ops import IMPOSSIBLE
from kdplug.teachers import TeacherSet, build_teacher_set


def calibrated_sample(n=600, classes=5, seed=0):
    """Logits and labels drawn from softmax(logits): a perfectly calibrated teacher."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).flatten()
    return logits, labels


def grid_nll(logits, labels, temperatures):
    """NLL of softmax(z / T) for each T, in numpy (independent of the implementation)."""
    z, y = logits.numpy(), labels.numpy()
    out = []
    for t in temperatures:
        scaled = z / t
        scaled = scaled - scaled.max(1, keepdims=True)
        log_p = scaled - np.log(np.exp(scaled).sum(1, keepdims=True))
        out.append(-log_p[np.arange(len(y)), y].mean())
    return np.array(out)


def test_fit_temperature_finds_the_nll_minimum():
    logits, labels = calibrated_sample()
    hot = logits * 4  # over-confident: the right temperature is about 4
    fitted = fit_temperature(hot, labels)
    grid = np.exp(np.linspace(np.log(0.5), np.log(20), 2000))
    best = grid[grid_nll(hot, labels, grid).argmin()]
    assert fitted == pytest.approx(best, rel=0.01)
    assert 3.0 < fitted < 5.5


def test_calibration_lowers_ece_of_an_over_confident_teacher():
    logits, labels = calibrated_sample(n=2000, seed=1)
    hot = logits * 10
    before = metrics.ece(torch.softmax(hot, -1), labels)
    temperature = fit_temperature(hot, labels)
    after = metrics.ece(torch.softmax(apply_temperature(hot, temperature), -1), labels)
    assert before > 0.1
    assert after < before / 3


def test_unlabeled_and_impossible_rows_do_not_move_the_fit():
    logits, labels = calibrated_sample(n=300, seed=2)
    hot = logits * 3
    reference = fit_temperature(hot, labels)
    noise = torch.randn(50, 5, dtype=torch.float64) * 9
    noise[:, 0] = IMPOSSIBLE  # the label is class 0, which the teacher says is impossible
    padded = fit_temperature(
        torch.cat([hot, noise, noise]),
        torch.cat([labels, torch.zeros(50, dtype=torch.long), torch.full((50,), -1)]),
    )
    assert padded == pytest.approx(reference, rel=1e-4)
    known = torch.tensor([True, True, True, True, False])
    keep = labels != 4
    masked = hot.clone()
    masked[:, 4] = IMPOSSIBLE
    assert fit_temperature(hot, labels, known) == pytest.approx(
        fit_temperature(masked[keep], labels[keep]), rel=1e-4
    )


def test_fit_temperature_stays_in_range_and_needs_rows():
    separable = torch.eye(4, dtype=torch.float64) * 50
    assert T_MIN <= fit_temperature(separable, torch.arange(4)) <= T_MAX
    with pytest.raises(UsageError, match="no labeled rows"):
        fit_temperature(torch.zeros(3, 4), torch.full((3,), -1))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32),
        min_size=2,
        max_size=12,
    ),
    st.floats(T_MIN, T_MAX),
)
def test_temperature_never_changes_the_argmax(values, temperature):
    z = torch.tensor(values, dtype=torch.float32)
    top2 = z.topk(2).values
    assume(float(top2[0] - top2[1]) > 1e-3 * max(1.0, abs(float(top2[0]))))
    probs = torch.softmax(apply_temperature(z, temperature), -1)
    assert int(probs.argmax()) == int(z.argmax())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 30.0))
def test_fitted_temperature_keeps_every_argmax(seed, scale):
    logits, labels = calibrated_sample(n=64, classes=4, seed=seed)
    z = (logits * scale).float()
    temperature = fit_temperature(z, labels)
    assert torch.equal(apply_temperature(z, temperature).argmax(-1), z.argmax(-1))


def write_calibration(path, entries):
    path.write_text(json.dumps({"teachers": entries}))


class Constant:
    classes = ["a", "b"]
    fingerprint = "sha256:abc"

    def __call__(self, x):
        return torch.tensor([[2.0, 0.0]]).expand(len(x), -1)


def test_load_temperatures_checks_spec_and_fingerprint(tmp_path):
    path = tmp_path / "calib.json"
    write_calibration(path, [{"spec": "t", "fingerprint": "sha256:abc", "temperature": 2.0}])
    assert load_temperatures(str(path), ["t"], ["sha256:abc"]) == [2.0]
    with pytest.raises(UsageError, match="teacher t changed since"):
        load_temperatures(str(path), ["t"], ["sha256:other"])
    with pytest.raises(UsageError, match="no temperature for teacher u"):
        load_temperatures(str(path), ["u"], [None])
    path.write_text("[1, 2]")
    with pytest.raises(UsageError, match="is not a kdplug calibration file"):
        load_temperatures(str(path), ["t"], [None])
    with pytest.raises(UsageError, match="calibration file not found"):
        load_temperatures(str(tmp_path / "absent.json"), ["t"], [None])


def test_teacher_set_applies_the_temperature():
    out = TeacherSet([Constant()], ["t"], ["a", "b"], temperatures=[4.0])(torch.zeros(1, 3))
    probs = torch.softmax(out.logits[0, 0].double(), -1)
    expected = torch.softmax(torch.tensor([0.5, 0.0], dtype=torch.float64), -1)
    torch.testing.assert_close(probs, expected)


def test_build_teacher_set_reads_the_calibration_file(tmp_path):
    logits = np.array([[1.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    np.save(tmp_path / "z.npy", logits)
    spec = f"logits:{tmp_path / 'z.npy'}"
    from kdplug.file_hashes import file_hash

    entry = {"spec": spec, "fingerprint": file_hash(tmp_path / "z.npy"), "temperature": 0.5}
    write_calibration(tmp_path / "calib.json", [entry])
    teacher_set = build_teacher_set([spec], ["0", "1"], calibration=str(tmp_path / "calib.json"))
    out = teacher_set(torch.zeros(2, 1), torch.tensor([0, 1]))
    expected = torch.log_softmax(torch.from_numpy(logits) / 0.5, -1)
    torch.testing.assert_close(torch.log_softmax(out.logits[0], -1), expected)


def test_nll_of_a_certain_right_teacher_is_zero_not_minus_zero():
    """float32 probabilities can sum a hair above 1: the NLL is clipped at 0, so a
    calibrate line never reads `NLL ... -> -0.0000`."""
    probs = np.array([[1.0000001, 0.0], [0.0, 1.0000001]], dtype=np.float32)
    assert metrics.nll(probs, np.array([0, 1])) == 0.0
    assert f"{metrics.nll(probs, np.array([0, 1])):.4f}" == "0.0000"
