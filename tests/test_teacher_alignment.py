"""Label-space alignment, row indices and bad rows in the TeacherSet."""

import numpy as np
import pytest
import torch

from kdplug import UsageError
from kdplug.ops import IMPOSSIBLE, teacher_probs
from kdplug.plugins import create
from kdplug.teachers import TeacherSet

CLASSES = ["cat", "dog", "fox"]


class Fixed:
    """A teacher returning given logits for every batch (one row repeated)."""

    def __init__(self, row, classes=None):
        self.row = torch.tensor(row, dtype=torch.float32)
        if classes is not None:
            self.classes = classes

    def __call__(self, x):
        return self.row.expand(len(x), -1).clone()


def softmax(values):
    values = np.asarray(values, dtype=np.float64)
    e = np.exp(values - values.max())
    return e / e.sum()


def run(teachers, names=None, **kwargs):
    names = names or [f"t{k}" for k in range(len(teachers))]
    teacher_set = TeacherSet(teachers, names, CLASSES, **kwargs)
    return teacher_set, teacher_set(torch.zeros(2, 4))


def test_teachers_on_different_class_subsets_abstain_where_they_do_not_know():
    full = Fixed([1.0, 2.0, 3.0])  # no names: run order
    subset = Fixed([0.5, -1.0], classes=["fox", "cat"])  # knows fox and cat only
    _, out = run([full, subset])
    assert out.known.tolist() == [[True, True, True], [True, False, True]]
    probs = teacher_probs(out.logits, out.known)[:, 0]
    np.testing.assert_allclose(probs[0], softmax([1.0, 2.0, 3.0]), rtol=1e-5)
    # renormalized over the classes it knows, in the run's order: cat=-1.0, fox=0.5
    cat, fox = softmax([-1.0, 0.5])
    np.testing.assert_allclose(probs[1], [cat, 0.0, fox], rtol=1e-5, atol=1e-7)
    assert (out.logits[1, :, 1] == IMPOSSIBLE).all()


def test_classes_beyond_the_run_are_dropped():
    wide = Fixed([0.1, 5.0, 0.2, 0.3], classes=["dog", "zebra", "cat", "fox"])
    _, out = run([wide])
    assert out.known.all()
    np.testing.assert_allclose(
        teacher_probs(out.logits, out.known)[0, 0], softmax([0.2, 0.1, 0.3]), rtol=1e-5
    )


def test_no_overlap_names_the_teacher_and_both_label_sets():
    with pytest.raises(UsageError) as error:
        run([Fixed([0.0, 1.0], classes=["car", "bus"])], names=["onnx:vehicles.onnx"])
    message = str(error.value)
    assert "onnx:vehicles.onnx shares no class" in message
    assert "['car', 'bus']" in message and "['cat', 'dog', 'fox']" in message


def test_class_count_mismatch_without_names():
    teacher_set = TeacherSet([Fixed([0.0] * 5)], ["torchscript:five.ts"], CLASSES)
    with pytest.raises(
        UsageError, match=r"torchscript:five.ts predicts 5 classes but the data has 3"
    ):
        teacher_set(torch.zeros(2, 4))


def test_named_teacher_returning_the_wrong_width():
    teacher_set = TeacherSet([Fixed([0.0] * 4, classes=CLASSES)], ["t"], CLASSES)
    with pytest.raises(UsageError, match="returned 4 logits but names 3 classes"):
        teacher_set(torch.zeros(2, 4))


def test_row_index_teachers_get_the_dataset_positions(tmp_path):
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.save(tmp_path / "z.npy", rows)
    precomputed = create("teachers", f"logits:{tmp_path / 'z.npy'},classes=fox;dog;cat")
    teacher_set = TeacherSet([precomputed, Fixed([0.0, 0.0, 0.0])], ["z", "flat"], CLASSES)
    out = teacher_set(torch.zeros(2, 4), torch.tensor([7, 2]))
    # run order cat, dog, fox = file columns 2, 1, 0
    torch.testing.assert_close(out.logits[0], torch.from_numpy(rows[[7, 2]][:, ::-1].copy()))
    with pytest.raises(UsageError, match="needs row indices"):
        teacher_set(torch.zeros(2, 4))
    with pytest.raises(UsageError, match="holds 10 rows but the data has 12"):
        teacher_set.check_rows(12)
    teacher_set.check_rows(10)


class NanOnSecondRow:
    def __call__(self, x):
        z = torch.zeros(len(x), 3)
        z[1:2, 0] = float("nan")
        return z


def test_nan_teacher_stops_the_run_naming_batch_and_teacher():
    teacher_set = TeacherSet([Fixed([1.0, 0.0, 0.0]), NanOnSecondRow()], ["ok", "bad"], CLASSES)
    with pytest.raises(UsageError, match=r"teacher bad returned NaN or Inf logits in batch 0 "):
        teacher_set(torch.zeros(3, 4))


def test_nan_rows_are_marked_with_skip_bad_rows():
    teacher_set = TeacherSet(
        [Fixed([1.0, 0.0, 0.0]), NanOnSecondRow()], ["ok", "bad"], CLASSES, skip_bad_rows=True
    )
    out = teacher_set(torch.zeros(3, 4))
    assert out.bad_rows.tolist() == [False, True, False]
    assert torch.isfinite(out.logits).all()
    clean = teacher_set(torch.zeros(1, 4))  # row 1 does not exist: nothing is bad
    assert clean.bad_rows is None


def test_only_rows_with_nan_or_inf_are_bad_however_large_the_finite_values():
    from kdplug.teachers import nonfinite_rows

    z = torch.zeros(6, 1000)
    z[1, 7], z[2, 999], z[3, 0] = float("nan"), float("inf"), -float("inf")
    z[4] = 3e38  # finite, though its float32 sum overflows
    z[5, :2] = torch.tensor([3e38, -3e38])
    assert nonfinite_rows(z).tolist() == [False, True, True, True, False, False]
    assert nonfinite_rows(z).tolist() == (~torch.isfinite(z).all(1)).tolist()


def test_temperatures_never_put_mass_on_impossible_classes():
    probabilities = Fixed([0.0, 0.4, 0.6])  # as a probability teacher passes them: log p
    probabilities.row = torch.where(
        probabilities.row > 0, probabilities.row.log(), torch.tensor(IMPOSSIBLE)
    )
    for temperature in (0.3, 1.0, 7.0):
        _, out = run([probabilities], temperatures=[temperature])
        probs = teacher_probs(out.logits, out.known, temperature=4.0)[0, 0]
        assert probs[0] == 0.0
        # p ** (1 / (T * 4)), renormalized
        expected = np.array([0.4, 0.6]) ** (1 / (temperature * 4.0))
        np.testing.assert_allclose(probs[1:], expected / expected.sum(), rtol=1e-5)
