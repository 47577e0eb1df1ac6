"""fixmatch and flexmatch against a line-by-line transcription of USB's code.

USB is microsoft/Semi-supervised-learning (commit 1ef4cbeb); each function below names the
file it follows. Hand-made tensors, CPU, each test well under a second.
"""

from collections import Counter
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

from kdplug import UsageError
from kdplug.api import LossStrategy, missing
from kdplug.plugins import create


# -- USB, transcribed ----------------------------------------------------------------------
def usb_ce_loss(logits, targets, reduction="none"):
    """semilearn/core/criterions/cross_entropy.py: ce_loss (hard targets)."""
    log_pred = F.log_softmax(logits, dim=-1)
    return F.nll_loss(log_pred, targets, reduction=reduction)


def usb_consistency_loss(logits, targets, mask):
    """semilearn/core/criterions/consistency.py: consistency_loss(..., name='ce', mask)."""
    loss = usb_ce_loss(logits, targets, reduction="none")
    loss = loss * mask
    return loss.mean()


def usb_pseudo_label(probs):
    """semilearn/algorithms/hooks/pseudo_label.py: gen_ulb_targets, use_hard_label=True."""
    return torch.argmax(probs.detach(), dim=-1)


def usb_fixed_mask(probs, p_cutoff):
    """semilearn/algorithms/hooks/masking.py: FixedThresholdingHook.masking, softmax_x_ulb=False."""
    max_probs, _ = torch.max(probs.detach(), dim=-1)
    return max_probs.ge(p_cutoff).to(max_probs.dtype)


class USBFlexMatchHook:
    """semilearn/algorithms/flexmatch/utils.py: FlexMatchThresholdingHook (CPU)."""

    def __init__(self, ulb_dest_len, num_classes, thresh_warmup=True):
        self.ulb_dest_len = ulb_dest_len
        self.num_classes = num_classes
        self.thresh_warmup = thresh_warmup
        self.selected_label = torch.ones((self.ulb_dest_len,), dtype=torch.long) * -1
        self.classwise_acc = torch.zeros((self.num_classes,))

    def update(self):
        pseudo_counter = Counter(self.selected_label.tolist())
        if max(pseudo_counter.values()) < self.ulb_dest_len:  # not all(5w) -1
            if self.thresh_warmup:
                for i in range(self.num_classes):
                    self.classwise_acc[i] = pseudo_counter[i] / max(pseudo_counter.values())
            else:
                wo_negative_one = deepcopy(pseudo_counter)
                if -1 in wo_negative_one.keys():
                    wo_negative_one.pop(-1)
                for i in range(self.num_classes):
                    self.classwise_acc[i] = pseudo_counter[i] / max(wo_negative_one.values())

    def masking(self, p_cutoff, probs_x_ulb, idx_ulb):
        max_probs, max_idx = torch.max(probs_x_ulb.detach(), dim=-1)
        mask = max_probs.ge(
            p_cutoff * (self.classwise_acc[max_idx] / (2.0 - self.classwise_acc[max_idx]))
        )  # convex
        select = max_probs.ge(p_cutoff)
        mask = mask.to(max_probs.dtype)
        if idx_ulb[select == 1].nelement() != 0:
            self.selected_label[idx_ulb[select == 1]] = max_idx[select == 1]
        self.update()
        return mask


def usb_unsup_term(logits_w, logits_s, lambda_u, mask_of):
    """semilearn/algorithms/{fixmatch/fixmatch.py,flexmatch/flexmatch.py}: train_step's
    ``lambda_u * unsup_loss``; ``mask_of(probs)`` is the MaskingHook call."""
    probs_x_ulb_w = torch.softmax(logits_w.detach(), dim=-1)  # algorithmbase.compute_prob
    mask = mask_of(probs_x_ulb_w)
    pseudo_label = usb_pseudo_label(probs_x_ulb_w)
    return lambda_u * usb_consistency_loss(logits_s, pseudo_label, mask), mask


# -- hand-made batches -----------------------------------------------------------------------
WEAK = torch.tensor(
    [
        [4.0, 0.0, -1.0],  # confident class 0 (p ~ 0.976)
        [0.2, 0.1, 0.0],  # unsure
        [0.0, 2.5, 0.0],  # class 1, p ~ 0.859
        [-2.0, 0.0, 3.5],  # confident class 2 (p ~ 0.970)
        [1.0, 1.0, 1.0],  # all equal: class 0 at 1/3
    ]
)
STRONG = torch.tensor(
    [
        [1.0, 0.5, -0.5],
        [0.0, 1.0, 0.3],
        [-1.0, 0.2, 0.8],
        [0.3, 0.3, 0.1],
        [2.0, -1.0, 0.0],
    ]
)
ROWS = torch.arange(5)


def ours(spec, weak, strong, teacher_probs=None, rows=None, loss=None):
    """The loss's consistency term and its gradient on the strong logits."""
    loss = loss or create("losses", spec)
    strong = strong.clone().requires_grad_(True)
    rows = torch.arange(len(weak)) if rows is None else rows
    value = loss.consistency(weak, strong, teacher_probs, rows)
    value.backward()
    return value.detach(), strong.grad


@pytest.mark.parametrize(
    "threshold,lambda_u,kept", [(0.3, 1.0, 5), (0.8, 1.0, 3), (0.95, 2.5, 2), (1.0, 1.0, 0)]
)
def test_fixmatch_equals_usb(threshold, lambda_u, kept):
    value, grad = ours(f"fixmatch,threshold={threshold},lambda_u={lambda_u}", WEAK, STRONG)
    strong = STRONG.clone().requires_grad_(True)
    mask_of = lambda probs: usb_fixed_mask(probs, threshold)  # noqa: E731
    expected, mask = usb_unsup_term(WEAK, strong, lambda_u, mask_of)
    expected.backward()
    assert int(mask.sum()) == kept  # some rows masked out, others not
    torch.testing.assert_close(value, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad, strong.grad, rtol=0, atol=0)


def flex_batches():
    """Eight batches of 4 of 8 unlabeled rows (rows revisited), C = 3, growing confidence."""
    generator = torch.Generator().manual_seed(10)
    batches = []
    for step in range(8):
        rows = torch.randperm(8, generator=generator)[:4]
        weak = torch.randn(4, 3, generator=generator) * (1.0 + step)
        strong = torch.randn(4, 3, generator=generator)
        batches.append((weak, strong, rows))
    return batches


@pytest.mark.parametrize("warmup", [True, False])
def test_flexmatch_equals_usb_over_successive_batches(warmup):
    threshold, lambda_u = 0.8, 1.5
    loss = create("losses", f"flexmatch,threshold={threshold},lambda_u={lambda_u},warmup={warmup}")
    loss.set_unlabeled_rows(8)
    hook = USBFlexMatchHook(8, 3, thresh_warmup=warmup)
    dropped = relaxed = 0  # rows masked out; rows kept that the fixed threshold drops
    for weak, strong, rows in flex_batches():
        value, grad = ours(None, weak, strong, rows=rows, loss=loss)
        usb_strong = strong.clone().requires_grad_(True)
        mask_of = lambda probs, rows=rows: hook.masking(threshold, probs, rows)  # noqa: E731
        expected, mask = usb_unsup_term(weak, usb_strong, lambda_u, mask_of)
        expected.backward()
        torch.testing.assert_close(value, expected.detach(), rtol=0, atol=0)
        torch.testing.assert_close(grad, usb_strong.grad, rtol=0, atol=0)
        state = loss.state_dict()
        assert torch.equal(state["selected_label"], hook.selected_label)
        torch.testing.assert_close(state["classwise_acc"], hook.classwise_acc, rtol=0, atol=0)
        fixed = usb_fixed_mask(torch.softmax(weak, -1), threshold)
        dropped += int((mask == 0).sum())
        relaxed += int(((mask == 1) & (fixed == 0)).sum())
    assert dropped >= 2 and relaxed >= 2  # the class-adaptive thresholds did both
    assert -1 in hook.selected_label.tolist()  # warmup still matters at the end


@pytest.mark.parametrize("warmup", [True, False])
def test_flexmatch_keeps_the_accuracy_when_one_value_fills_every_row(warmup):
    """USB updates classwise_acc only while no value (-1 or a class) holds every row."""
    loss = create("losses", f"flexmatch,threshold=0.9,warmup={warmup}")
    loss.set_unlabeled_rows(2)
    hook = USBFlexMatchHook(2, 3, thresh_warmup=warmup)
    steps = [
        (torch.tensor([[0.0, 5.0, 0.0]]), torch.tensor([0])),  # row 0: class 1
        (torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), torch.tensor([0, 1])),  # both 0
    ]
    for weak, rows in steps:
        ours(None, weak, torch.zeros_like(weak), rows=rows, loss=loss)
        hook.masking(0.9, torch.softmax(weak, -1), rows)
        state = loss.state_dict()
        assert torch.equal(state["selected_label"], hook.selected_label)
        torch.testing.assert_close(state["classwise_acc"], hook.classwise_acc, rtol=0, atol=0)
    assert hook.selected_label.tolist() == [0, 0]
    assert hook.classwise_acc.tolist() == [0.0, 1.0, 0.0]  # the first batch's, kept


def test_a_step_without_unlabeled_rows_adds_zero():
    for name in ("fixmatch", "flexmatch"):
        loss = create("losses", name)
        loss.set_unlabeled_rows(4)
        empty = torch.zeros(0, 3)
        value, grad = ours(None, empty, empty, rows=torch.zeros(0, dtype=torch.long), loss=loss)
        assert value.item() == 0.0 and grad.shape == (0, 3)


# -- the teachers: rows where they are confident take their class -----------------------------
def ce(logits, label):
    return float(-torch.log_softmax(logits, -1)[label])


# weak-view probabilities made by hand (log p as logits): confident 0, confident 1, unsure,
# unsure; the teachers: confident 2, unsure, unsure, confident 0; threshold 0.8
STUDENT_PROBS = torch.tensor(
    [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.5, 0.3, 0.2], [0.4, 0.35, 0.25]]
)
TEACHER_PROBS = torch.tensor(
    [[0.05, 0.05, 0.9], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4], [0.85, 0.1, 0.05]]
)
S = torch.tensor([[0.5, -0.5, 1.0], [0.0, 2.0, -1.0], [1.0, 0.0, 0.0], [0.2, 0.4, -0.3]])


@pytest.mark.parametrize(
    "source,expected",
    [
        ("auto", (ce(S[0], 2) + ce(S[1], 1) + ce(S[3], 0)) / 4),  # row 2: nobody sure
        ("teachers", (ce(S[0], 2) + ce(S[3], 0)) / 4),
        ("student", (ce(S[0], 0) + ce(S[1], 1)) / 4),
    ],
)
def test_teacher_rows_take_the_teachers_class(source, expected):
    value, _ = ours(
        f"fixmatch,threshold=0.8,source={source},lambda_u=2", STUDENT_PROBS.log(), S, TEACHER_PROBS
    )
    assert value.item() == pytest.approx(2 * expected, rel=1e-6)


def test_without_teachers_auto_is_the_student_alone():
    alone, _ = ours("fixmatch,threshold=0.8", STUDENT_PROBS.log(), S, None)
    assert alone.item() == pytest.approx((ce(S[0], 0) + ce(S[1], 1)) / 4, rel=1e-6)


def test_flexmatch_with_teachers_uses_its_thresholds_on_the_student_rows():
    """Fresh state: classwise_acc is 0, so every student row passes (USB's start); the
    teachers' rows still take their class, and the state learns the student's classes."""
    loss = create("losses", "flexmatch,threshold=0.8")
    loss.set_unlabeled_rows(6)
    rows = torch.tensor([5, 1, 2, 3])
    value, _ = ours(None, STUDENT_PROBS.log(), S, TEACHER_PROBS, rows=rows, loss=loss)
    expected = (ce(S[0], 2) + ce(S[1], 1) + ce(S[2], 0) + ce(S[3], 0)) / 4
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert loss.state_dict()["selected_label"].tolist() == [-1, 1, -1, -1, -1, 0]


def test_teachers_source_turns_the_teachers_on():
    assert create("losses", "fixmatch,source=teachers").uses_teachers
    assert not create("losses", "fixmatch").uses_teachers
    assert create("losses", "fixmatch,base=kd").uses_teachers


# -- ce + fixmatch is plain FixMatch --------------------------------------------------------------
def test_ce_base_with_fixmatch_is_plain_fixmatch():
    """The engine's step total ``ce_weight * CE + kd_weight * loss + consistency`` equals
    USB's ``sup_loss + lambda_u * unsup_loss`` (fixmatch.py, train_step)."""
    loss = create("losses", "fixmatch,threshold=0.8,lambda_u=1.5")
    assert not loss.uses_teachers
    logits_lb, y_lb = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 1])
    rows = torch.arange(len(WEAK))
    ours_total = (
        loss.ce_weight * F.cross_entropy(logits_lb, y_lb)
        + loss.kd_weight * loss(logits_lb, None, y_lb)
        + loss.consistency(WEAK, STRONG, None, rows)
    )
    unsup, _ = usb_unsup_term(WEAK, STRONG, 1.5, lambda p: usb_fixed_mask(p, 0.8))
    usb_total = usb_ce_loss(logits_lb, y_lb, reduction="mean") + unsup
    torch.testing.assert_close(ours_total, usb_total, rtol=0, atol=0)


# -- state, contract, options ------------------------------------------------------------------
def test_flexmatch_state_round_trip():
    batches = flex_batches()
    trained = create("losses", "flexmatch,threshold=0.8")
    trained.set_unlabeled_rows(8)
    for weak, strong, rows in batches[:3]:
        trained.consistency(weak, strong, None, rows)
    state = trained.state_dict()
    assert (
        set(state) == {"selected_label", "classwise_acc"} and (state["selected_label"] >= 0).any()
    )
    before, after = (
        create("losses", "flexmatch,threshold=0.8"),
        create("losses", "flexmatch,threshold=0.8"),
    )
    before.load_state_dict(state)  # --resume: restored, then told the rows
    before.set_unlabeled_rows(8)
    after.set_unlabeled_rows(8)  # or told the rows, then restored
    after.load_state_dict(state)
    weak, strong, rows = batches[3]
    reference = trained.consistency(weak, strong, None, rows)
    for resumed in (before, after):
        torch.testing.assert_close(resumed.consistency(weak, strong, None, rows), reference)
        for key, value in trained.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value)
    other = create("losses", "flexmatch")
    other.load_state_dict(state)
    with pytest.raises(UsageError, match="covers 8 unlabeled rows and this run has 12"):
        other.set_unlabeled_rows(12)


def test_fixmatch_has_no_state():
    loss = create("losses", "fixmatch")
    assert loss.state_dict() == {}
    loss.load_state_dict({})
    with pytest.raises(UsageError, match="another loss's state"):
        loss.load_state_dict({"selected_label": torch.zeros(1)})


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch"])
def test_contract_members(name):
    loss = create("losses", f"{name},base=kd,T=4,mu=3,strong=rand-m9-n3")
    assert missing(loss, LossStrategy) == []
    assert loss.unlabeled_ratio == 3.0 and loss.strong_augment == {"auto_augment": "rand-m9-n3"}
    assert loss.temperature == 4.0 and loss.ce_weight == 0.1 and loss.kd_weight == 0.9
    assert create("losses", name).strong_augment == {"auto_augment": "rand-m10-n2-mstd0.5"}


@pytest.mark.parametrize("strong", ["rand-m10-n2-mstd0.5", "rand-m5-n1-inc1"])
def test_strong_augment_is_a_timm_transform(strong):
    from PIL import Image
    from timm.data import create_transform

    loss = create("losses", f"fixmatch,strong={strong}")
    transform = create_transform(16, is_training=True, **loss.strong_augment)
    torch.manual_seed(0)
    image = Image.new("RGB", (16, 16), (120, 30, 200))
    assert transform(image).shape == (3, 16, 16)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("fixmatch,threshold=0", r"^fixmatch: threshold must be in \(0, 1\], got 0.0$"),
        ("flexmatch,threshold=1.5", r"^flexmatch: threshold must be in \(0, 1\], got 1.5$"),
        ("fixmatch,mu=0", r"^fixmatch: mu must be > 0, got 0.0$"),
        ("fixmatch,lambda_u=-1", r"^fixmatch: lambda_u must be >= 0, got -1.0$"),
        ("fixmatch,strong=original", r"^fixmatch: strong must be a timm RandAugment string"),
        ("fixmatch,strong=rand-m1.5", r"^fixmatch: strong must be a timm RandAugment string"),
        ("fixmatch,strong=rand-mx-n2", r"^fixmatch: strong must be a timm RandAugment string"),
        ("fixmatch,source=best", r"^fixmatch: source must be one of auto, teachers, student"),
        ("flexmatch,source=teachers", r"^flexmatch: source=teachers leaves no row"),
        ("flexmatch,warmup=3", r"^flexmatch: option warmup='3' must be true or false$"),
        ("fixmatch,base=fixmatch", r"^fixmatch: base must name another loss"),
        ("fixmatch,base=flexmatch", r"^fixmatch: base=flexmatch adds a term of its own"),
        ("fixmatch,base=kd,T=-1", r"^kd: T must be > 0, got -1$"),
    ],
)
def test_bad_options_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message) as error:
        create("losses", spec)
    assert "\n" not in str(error.value)


def test_python_options_are_checked_too():
    with pytest.raises(UsageError, match=r"^fixmatch: mu must be a number, got 'seven'$"):
        create("losses", "fixmatch", mu="seven")
    with pytest.raises(UsageError, match=r"^flexmatch: warmup must be true or false, got 1$"):
        create("losses", "flexmatch", warmup=1)
