"""``fixmatch`` and ``flexmatch``: consistency on unlabeled rows, added to a base loss.

As USB (microsoft/Semi-supervised-learning) computes them: the student's prediction on a
row's weak view, where confident enough, is the hard target of its strong view,
``lambda_u * mean_rows(mask * CE(pseudo_label, strong_logits))``. With teachers
(``source=auto``) a row the teachers' combined prediction is confident on takes the
teachers' class instead. ``flexmatch`` scales the threshold per class by how many rows the
student already predicts confidently in that class (FlexMatch's ``classwise_acc``).
See docs/losses.md.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from kdplug.api import UsageError
from kdplug_losses.checks import non_negative, positive
from kdplug_losses.on_base import OnBase

SOURCES = ("auto", "teachers", "student")
RAND_SECTION = re.compile(r"t.+|[a-z]+\d.*")


def threshold_option(loss: str, value: float) -> float:
    """A confidence threshold: a number in (0, 1]."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0 < value <= 1:
        raise UsageError(f"{loss}: threshold must be in (0, 1], got {value}")
    return float(value)


def number_option(loss: str, option: str, value: Any) -> float:
    """``value`` if it is a number, else a UsageError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{loss}: {option} must be a number, got {value!r}")
    return value


def rand_augment(loss: str, strong: str) -> str:
    """``strong`` if timm's ``rand_augment_transform`` builds a RandAugment from it."""
    from timm.data.auto_augment import rand_augment_transform

    try:
        # timm skips a section that is neither t<name> nor <key><number>: refuse it here
        sections = strong.split("-")
        if sections[0] != "rand" or not all(RAND_SECTION.fullmatch(s) for s in sections[1:]):
            raise ValueError
        rand_augment_transform(strong, {})
    except Exception:
        raise UsageError(
            f"{loss}: strong must be a timm RandAugment string such as rand-m10-n2-mstd0.5, "
            f"got {strong!r}"
        ) from None
    return strong


class FixMatch(OnBase):
    """FixMatch's term (fixed threshold) on top of ``base``; see the module docstring."""

    def __init__(
        self,
        base: str,
        threshold: float,
        lambda_u: float,
        mu: float,
        strong: str,
        source: str,
        base_options: dict[str, Any],
        name: str = "fixmatch",
    ):
        self.threshold = threshold_option(name, threshold)
        self.lambda_u = non_negative(name, "lambda_u", number_option(name, "lambda_u", lambda_u))
        self.unlabeled_ratio = positive(name, "mu", number_option(name, "mu", mu))
        self.strong_augment = {"auto_augment": rand_augment(name, strong)}
        if source not in SOURCES:
            raise UsageError(f"{name}: source must be one of {', '.join(SOURCES)}, got {source!r}")
        self.source = source
        super().__init__(name, base, base_options, teachers=source == "teachers")

    def consistency(
        self,
        weak_logits: torch.Tensor,
        strong_logits: torch.Tensor,
        teacher_probs: torch.Tensor | None,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """``lambda_u * mean(mask * CE(pseudo_label, strong_logits))`` over the ``U`` rows:
        weak and strong logits ``[U, C]``, the teachers' combined prediction ``[U, C]`` or
        None, ``rows [U]`` the rows' positions among the unlabeled rows. 0 when U is 0."""
        if len(weak_logits) == 0:
            return strong_logits.float().sum() * 0.0
        probs = torch.softmax(weak_logits.detach().float(), dim=-1)
        confidence, pseudo_label = probs.max(dim=-1)
        mask = self.student_mask(confidence, pseudo_label, rows.to(probs.device), probs.shape[-1])
        if self.source != "student":
            pseudo_label, mask = self.with_teachers(pseudo_label, mask, teacher_probs)
        log_q = torch.log_softmax(strong_logits.float(), dim=-1)
        per_row = torch.nn.functional.nll_loss(log_q, pseudo_label, reduction="none")
        return self.lambda_u * (per_row * mask).mean()

    def student_mask(
        self, confidence: torch.Tensor, label: torch.Tensor, rows: torch.Tensor, classes: int
    ) -> torch.Tensor:
        """1.0 where the student's weak-view confidence reaches ``threshold``, else 0.0."""
        return confidence.ge(self.threshold).to(confidence.dtype)

    def with_teachers(
        self, label: torch.Tensor, mask: torch.Tensor, teacher_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows where the teachers' top probability reaches ``threshold`` take their class
        with mask 1; the others keep the student's (``auto``) or are masked (``teachers``)."""
        if teacher_probs is None:
            if self.source == "teachers":
                raise ValueError(f"{self.name}: source=teachers and no teacher prediction came")
            return label, mask
        top, teacher_label = teacher_probs.detach().float().max(dim=-1)
        confident = top.ge(self.threshold)
        if self.source == "teachers":
            return teacher_label, confident.to(mask.dtype)
        return torch.where(confident, teacher_label, label), torch.where(confident, 1.0, mask)

    def set_unlabeled_rows(self, rows: int) -> None:
        """A fixed threshold keeps nothing per row."""

    def state_dict(self) -> dict[str, Any]:
        """A fixed threshold learns nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Only an empty state is this loss's."""
        if state:
            raise UsageError(
                f"{self.name}: the checkpoint holds another loss's state {sorted(state)}"
            )

    def options(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "lambda_u": self.lambda_u,
            "mu": self.unlabeled_ratio,
            "strong": self.strong_augment["auto_augment"],
            "source": self.source,
        }


class FlexMatch(FixMatch):
    """FixMatch with FlexMatch's class-adaptive thresholds, as USB's
    ``FlexMatchThresholdingHook`` (semilearn/algorithms/flexmatch/utils.py) computes them.

    ``selected_label [N]`` holds, for each unlabeled row, the class the student last
    predicted on it with confidence >= ``threshold`` (-1: never). ``classwise_acc [C]`` is
    each class's count of such rows over the largest count (with ``warmup``, the -1 rows
    count as one more class). A row is kept when its confidence reaches
    ``threshold * acc / (2 - acc)`` of its predicted class (the convex mapping), computed
    before this batch's rows update ``selected_label``.
    """

    def __init__(self, warmup: bool, **options: Any):
        super().__init__(name="flexmatch", **options)
        if not isinstance(warmup, bool):
            raise UsageError(f"flexmatch: warmup must be true or false, got {warmup!r}")
        if self.source == "teachers":
            raise UsageError(
                "flexmatch: source=teachers leaves no row to the class-adaptive thresholds; "
                "use fixmatch,source=teachers"
            )
        self.warmup = warmup
        self.selected_label: torch.Tensor | None = None
        self.classwise_acc = torch.zeros(0)
        self.restored = False  # a loaded state waiting for set_unlabeled_rows' check

    def set_unlabeled_rows(self, rows: int) -> None:
        """Start with no row selected; keep a state restored for these rows (``--resume``)."""
        if self.selected_label is not None and self.restored:
            if len(self.selected_label) != rows:
                raise UsageError(
                    f"flexmatch: the checkpoint's state covers {len(self.selected_label)} "
                    f"unlabeled rows and this run has {rows}; resume with the same --unlabeled"
                )
            self.restored = False
            return
        self.selected_label = torch.full((rows,), -1, dtype=torch.long)
        self.classwise_acc = torch.zeros(0)
        self.restored = False

    def student_mask(
        self, confidence: torch.Tensor, label: torch.Tensor, rows: torch.Tensor, classes: int
    ) -> torch.Tensor:
        """USB's ``masking``: the mask from the current ``classwise_acc``, then the update."""
        if self.selected_label is None:
            raise ValueError("flexmatch: consistency was called before set_unlabeled_rows")
        if len(self.classwise_acc) == 0:
            self.classwise_acc = torch.zeros(classes)
        if len(self.classwise_acc) != classes:
            raise ValueError(
                f"flexmatch: its state has {len(self.classwise_acc)} classes, logits {classes}"
            )
        self.selected_label = self.selected_label.to(confidence.device)
        self.classwise_acc = self.classwise_acc.to(confidence.device)
        acc = self.classwise_acc[label]
        mask = confidence.ge(self.threshold * (acc / (2.0 - acc))).to(confidence.dtype)
        select = confidence.ge(self.threshold)
        self.selected_label[rows] = torch.where(select, label, self.selected_label[rows])
        self.update_accuracy()
        return mask

    def update_accuracy(self) -> None:
        """USB's ``update``: per-class counts of selected rows over the largest count (with
        -1 as a class under ``warmup``), unless one value (-1 included) fills every row."""
        classes = len(self.classwise_acc)
        counts = torch.bincount(self.selected_label + 1, minlength=classes + 1)
        per_class = counts[1 : classes + 1]
        largest = counts.max() if self.warmup else per_class.max()
        updated = per_class.to(self.classwise_acc.dtype) / largest.clamp(min=1)
        not_all_one = counts.max() < len(self.selected_label)
        self.classwise_acc = torch.where(not_all_one, updated, self.classwise_acc)

    def state_dict(self) -> dict[str, Any]:
        """The rows' selected classes and the per-class accuracies, on the CPU."""
        if self.selected_label is None:
            return {}
        return {
            "selected_label": self.selected_label.detach().cpu().clone(),
            "classwise_acc": self.classwise_acc.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s tensors (checked against ``set_unlabeled_rows``' count)."""
        if not state:
            return
        if set(state) != {"selected_label", "classwise_acc"}:
            raise UsageError(
                f"flexmatch: the checkpoint holds another loss's state {sorted(state)}"
            )
        rows = None if self.selected_label is None else len(self.selected_label)
        self.selected_label = state["selected_label"].long().clone()
        self.classwise_acc = state["classwise_acc"].float().clone()
        self.restored = True
        if rows is not None:
            self.set_unlabeled_rows(rows)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "warmup": self.warmup}
