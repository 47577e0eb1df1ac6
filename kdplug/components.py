"""The component contract: every member kdplug's engines read from a plugin's components.

One Protocol per kind: ``Teacher``, ``Student``, ``LossStrategy``, ``Combiner``,
``LabelGenerator``, and ``Producer`` (where ``distill`` gets its teacher outputs). A member
declared with a value is optional, and the value is what the engines assume when a
component lacks it (as simonw/llm's ``Model`` declares ``can_stream = False``); an optional
method is marked ``@optional`` and its body is that default. A member without a value is
required: ``missing(obj, Protocol)`` names those an object lacks. A component is any object
with the required members; it may also subclass its Protocol to inherit the defaults.
docs/plugins.md ("The component contract") documents each member; tests/test_contract.py
checks that every attribute the engines read is declared here, documented there, and read
with the default declared here.

Typing only: nothing here imports torch at runtime. Shapes: ``K`` teachers, ``B`` rows in
a batch, ``N`` rows in a dataset, ``C`` classes; labels are int64 with -1 for unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import torch

    from kdplug.teachers import TeacherOutputs

F = TypeVar("F", bound=Callable[..., Any])


def optional(method: F) -> F:
    """Mark a Protocol method as optional: its body is what the engines assume without it."""
    method.__kdplug_optional__ = True  # type: ignore[attr-defined]
    return method


class Teacher(Protocol):
    """``teacher(x) -> logits [B, C_t]`` float32, ``C_t`` the teacher's own classes.

    ``x`` is a float32 batch, images ``[B, C, H, W]`` in [0, 1] at the data's own size or
    rows ``[B, D]``; the teacher adapts it (resize, normalize, flatten). Probabilities are
    returned as ``log p`` with exact zeros as ``kdplug.ops.IMPOSSIBLE``. The engines call it
    once per batch in ``torch.inference_mode`` (``kdplug.teachers.TeacherSet``); a teacher
    that is a ``torch.nn.Module`` is moved to the run's device and put in eval mode first.
    """

    classes: Sequence[str] | None = None
    """Label names in output order: outputs are aligned to the run's classes by name, and a
    run class it lacks is one it abstains on. None: its outputs are in the run's order."""

    name: str | None = None
    """What tables, figures and logs call it when its spec sets no ``name=`` (a store
    teacher: the name it was cached under). None: the stem of its REF's file
    (``kdplug.teacher_names``)."""

    fingerprint: str | None = None
    """A hash of the files it came from: recorded in every run's outputs; a calibration
    file's temperature and a store's outputs count only for the same fingerprint."""

    uses_row_index: bool = False
    """True: called as ``teacher(x, index)``, ``index [B]`` int64 the rows' positions in
    their dataset (precomputed outputs), on the CPU; refused by ``cache --views`` > 1 and by
    ``label --calibration-data``."""

    uses_inputs: bool = True
    """False: it never reads ``x`` (precomputed outputs served by row: ``logits:``,
    ``store:``). When no teacher of a ``label`` or ``cache`` run reads its inputs (and
    ``cache --views`` is 1), DATA's rows are not read: ``x`` is a zero tensor of the inputs'
    shape (one element, broadcast)."""

    num_rows: int | None = None
    """With ``uses_row_index``: the row count it holds; data with another count is refused."""

    data_fingerprint: str | None = None
    """With ``uses_row_index``: the fingerprint of the data its rows belong to; ``label``,
    ``teachers report`` and ``cache`` refuse data with another one."""

    inputs: Mapping[str, Any] | None = None
    """What it feeds its model: ``size`` ``[H, W]`` (None: the data's own), ``mean`` and
    ``std`` per channel (None: ``normalize_like_data`` gives them), ``in_chans``, and
    ``from``: where each of size, mean and std came from. Every command logs one line per
    teacher from it and records it in its JSON output. None: it says nothing."""

    normalize_like_data: Callable[[list[float], list[float], str], None] | None = None
    """``normalize_like_data(mean, std, where)``: its input normalization is unknown (a
    checkpoint that records none); before any batch the engine calls it once with the
    per-channel mean and std of the data it runs on, measured as ``distill`` measures a
    student's, and ``where`` says how. None: it knows its own."""

    intermediates: (
        Callable[[torch.Tensor, Sequence[int]], tuple[torch.Tensor, list[torch.Tensor]]] | None
    ) = None
    """``intermediates(x, stages) -> (logits [B, C_t], features)``: one forward giving its
    logits and its features ``[B, C_i, H_i, W_i]`` at ``stages`` (timm's
    ``forward_intermediates`` indices), for feature losses. None: it offers no features."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Student(Protocol):
    """A ``torch.nn.Module`` mapping ``[B, in_chans, H, W]`` (normalized) to logits
    ``[B, num_classes]`` (a tabular one: ``[B, D]`` feature rows); ``distill`` trains it with
    its optimizer, scheduler, EMA and ``state_dict``, and saves it as a student directory
    (``kdplug.model_dir``).
    """

    input_normalization: tuple[Sequence[float], Sequence[float]] | None = None
    """``(mean, std)`` per input channel the student's inputs are normalized with (given,
    or its weights'); None: ``distill`` measures them on the train data."""

    pretrained_cfg: Mapping[str, Any] = MappingProxyType({})
    """timm's model config; its ``architecture`` is recorded in the student directory (else
    the spec's REF), and ``timm.create_model`` rebuilds the student from it."""

    data_kind: str = "image"
    """The rows it takes: ``"image"`` (``[B, in_chans, H, W]``) or ``"tabular"`` (feature
    rows ``[B, D]``; its factory's ``in_chans`` is D). ``distill`` refuses data of the other
    kind."""

    fit_inputs: Callable[[torch.Tensor], None] | None = None
    """``fit_inputs(x [N, D])``, a tabular student's: called once before training with every
    ``--train`` row (unnormalized, finite), e.g. to fit a feature normalization kept in its
    ``state_dict``. None: nothing to fit."""

    model_args: Mapping[str, Any] | None = None
    """JSON-ready options of its factory that rebuild it (with the class and feature
    counts), recorded in the student directory: a student that is not a timm model is
    rebuilt from them through the students registry. None: a timm model
    (``timm.create_model(architecture)``)."""

    forward_intermediates: Callable[..., Any] | None = None
    """timm's ``forward_intermediates(x, indices=stages, intermediates_only=False) ->
    (final, features)``: the features a feature loss reads. None: refused by feature losses."""

    forward_head: Callable[..., Any] | None = None
    """timm's ``forward_head(final) -> logits [B, num_classes]`` of ``forward_intermediates``'
    final map (with it, one pass gives a feature loss both). None: refused by feature
    losses."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class LossStrategy(Protocol):
    """``loss(student_logits [B, C], target [B, C], labels [B]) -> scalar tensor``.

    ``target`` is the combined teacher distribution at ``temperature`` (None when
    ``uses_teachers`` is False). Each training step minimizes
    ``ce_weight * CE(labeled rows) + kd_weight * loss(...)``.
    """

    temperature: float
    """The T at which the engine combines the teachers into ``target`` (read per step)."""

    standardize: bool
    """True: the engine z-scores the teachers' logits before combining them."""

    uses_teachers: bool
    """False: a labels-only loss; no teacher, combiner or producer is built or run."""

    ce_weight: float
    """Weight of the cross-entropy on the labeled rows in each step's total."""

    kd_weight: float
    """Weight of the loss's own term in each step's total."""

    fit: Callable[..., dict[str, Any]] | None = None
    """``fit(logits [K, N, C], known [K, C], labels [N], combiner) -> dict``, called once
    on the labeled rows after the combiner's ``fit`` and before training (``kd,T=auto``
    chooses T); the JSON-ready dict goes into summary.json. None: nothing to fit, and no
    teacher pass is made for it."""

    @optional
    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (``epoch`` from 0), e.g. for a warm-up."""

    strong_augment: Mapping[str, Any] | None = None
    """Set: a consistency loss (FixMatch family). Each row is served twice, its weak view
    (``--augment``'s, else the row as it is) and a strong one (timm's ``create_transform``
    with these options, e.g. ``{"auto_augment": "rand-m10-n2-mstd0.5"}``, on the decoded
    image); teachers see the weak view, the student both in one forward, and ``consistency``
    is added to each step's total. None: one view."""

    unlabeled_ratio: float | None = None
    """μ, with ``strong_augment``: each step holds ``batch_size / (1 + μ)`` labeled rows
    (cycled) and the rest unlabeled; an epoch is one pass over the unlabeled rows. None: the
    train and unlabeled rows shuffled together."""

    @optional
    def set_unlabeled_rows(self, rows: int) -> None:
        """With ``strong_augment``: called once before training with the run's number of
        unlabeled rows (``consistency``'s ``rows`` are below it)."""

    consistency: Callable[..., torch.Tensor] | None = None
    """``consistency(weak_logits, strong_logits, teacher_probs, rows) -> scalar``, with
    ``strong_augment``: the weighted term of the step's unlabeled rows (added to the total):
    the student's logits ``[U, C]`` on their weak views (no gradient) and strong views, the
    teachers' combined prediction at temperature 1 ``[U, C]`` (None when ``uses_teachers``
    is False), ``rows [U]`` their positions among the unlabeled rows."""

    feature_stages: Sequence[int] | None = None
    """Set: a feature loss (FitNets, ReviewKD). The student's and one teacher's features at
    these stages (timm's ``forward_intermediates`` ``indices``; negative from the last) reach
    ``feature_loss``; a student without ``forward_intermediates``, or no teacher with
    ``intermediates``, is refused. None: logits only."""

    feature_teacher: str | None = None
    """With ``feature_stages``: the name of the teacher whose features are read; None: the
    first teacher that has ``intermediates``."""

    build_projector: Callable[..., torch.nn.Module] | None = None
    """``build_projector(student_shapes, teacher_shapes) -> module``, with
    ``feature_stages``: called once before training with each stage's feature shape
    ``(C, H, W)`` of the student and of the teacher; the learned modules between them (a
    regressor), trained with the student by its optimizer and kept in the run's checkpoint,
    not in the student directory."""

    feature_loss: Callable[..., torch.Tensor] | None = None
    """``feature_loss(projector, student_features, teacher_features) -> scalar``, with
    ``feature_stages``: the weighted term (added to the step's total) from the features
    ``[B, C_i, H_i, W_i]`` of each stage, in ``feature_stages``' order."""

    @optional
    def state_dict(self) -> dict[str, Any]:
        """What the loss learns while training (FlexMatch's per-row predictions), kept in
        the checkpoint for ``--resume``. Default: nothing."""
        return {}

    @optional
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s result on ``--resume``."""

    def __call__(
        self, student_logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor: ...


class Combiner(Protocol):
    """``combiner(logits [K, B, C], known [K, C], labels [B], temperature) ->
    (weights [K, B], target [B, C])``: per-row teacher weights (non-negative, summing to 1
    over K) and the combined soft target at ``temperature``. ``known[k, c]`` is False where
    teacher k cannot predict class c; labels are -1 on unlabeled rows.
    """

    fit: Callable[..., dict[str, Any]] | None = None
    """``fit(logits [K, N, C], known [K, C], labels [N]) -> dict``, called once on the
    labeled rows (label -1 rows to be ignored) before any row is combined; the JSON-ready
    dict is recorded (``kdplug.fitting``). None: nothing to fit, no teacher pass for it."""

    predict: Callable[..., tuple[Any, Any]] | None = None
    """``predict(logits, known, labels) -> (weights [K, B], probs [B, C])``: the combined
    prediction ``label`` writes and reports score, where it is not the target at
    temperature 1 (``auto``: calibrated teachers). None: the target at temperature 1."""

    def __call__(
        self,
        logits: torch.Tensor,
        known: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Labels:
    """A label generator's decision for N rows."""

    label: torch.Tensor  # [N] int64, -1 where rejected
    accepted: torch.Tensor  # [N] bool
    probs: torch.Tensor  # [N, C] soft label written with each row
    info: dict[str, Any] = field(default_factory=dict)  # parameters/estimates for the report


class LabelGenerator(Protocol):
    """Contract version 2 (streaming): ``label`` calls ``prepare(shards)`` once, then
    ``decide(rows)`` once per shard in row order, then ``summary()``; the rows are those of
    DATA where no teacher gave NaN/Inf (``kdplug.label_shards``). Memory stays one shard's.

    Version 1, a generator with only ``__call__`` on all rows, still works: ``label`` runs
    it through ``kdplug.label_shards.AllRows``, which holds every row's target and teacher
    probabilities in memory at once. ``kdplug.api.StreamingGenerator`` is a base with every
    default below and ``__call__`` built from ``prepare`` and ``decide``."""

    topk: int | None = None
    """k: the labeled dataset holds each row's k most probable classes (``topk_indices``,
    ``topk_values``) instead of ``probs``, unless ``--probs`` says otherwise. None: as
    ``--probs auto`` decides."""

    private: bool = False
    """True: only labels and probs are released; per-row teacher statistics (the
    ``agreement`` column) are left out of the dataset."""

    teacher_probs: bool = False
    """True: ``rows.teacher_probs [K, R, C]`` is filled (the shards then store them: ``K``
    times the disk of the target); False: None, and ``rows.votes`` is all of the teachers."""

    fit: Callable[..., dict[str, Any]] | None = None
    """``fit(prediction [M, C], labels [M]) -> dict``, called once before ``prepare``
    with the combined prediction of labeled rows and their labels (``--calibration-data``'s,
    each from a combiner not fitted on it; else DATA's own labeled rows, never
    ``--eval-labels``); the JSON-ready dict goes into report.json. ``label`` refuses a run
    with no such rows. None: nothing to fit."""

    @optional
    def prepare(self, shards: Any) -> None:
        """Gather what ``decide`` needs over all rows: ``shards`` (a ``LabelShards``) yields
        each shard's ``ShardRows`` when iterated, as many times as the generator needs;
        ``shards.scores()`` gives every row's confidence and class. Default: nothing."""

    @optional
    def decide(self, rows: Any) -> Labels:
        """``Labels`` for one shard's ``rows`` (a ``ShardRows``: ``index [R]``, ``target
        [R, C]``, ``votes [K, R]``, ``known [K, C]``, ``teacher_probs``); its ``info`` is
        not read (``summary`` is). Without it the generator is version 1: ``__call__``."""
        ...

    @optional
    def summary(self) -> dict[str, Any]:
        """The generator's figures for the report (``generator.info``), after the last
        ``decide``. Default: none."""
        return {}

    @optional
    def __call__(
        self, target: torch.Tensor, teacher_probs: torch.Tensor, known: torch.Tensor
    ) -> Labels:
        """Version 1: ``Labels`` for all rows at once (``target [N, C]``, ``teacher_probs
        [K, N, C]``, ``known [K, C]``), used where there is no ``decide``."""
        ...


class Producer(Protocol):
    """Where ``distill`` gets teacher outputs: the live teachers
    (``kdplug.teachers.TeacherSet``), a teacher store (``kdplug.store.producer.StoreProducer``)
    or any object given as ``distill(config, producer=...)``.

    ``producer(x, idx) -> TeacherOutputs`` (``logits [K, B, C]``, ``known [K, C]``,
    ``bad_rows [B]`` or None) for ``x`` on the run's device and ``idx [B]`` the rows'
    positions (train rows, then unlabeled rows). Before training the engine calls ``to``,
    ``check_rows`` and, to fit the combiner and loss, ``producer`` on the labeled rows;
    before each epoch ``set_epoch``, and per training step ``producer`` on a batch whose
    inputs the loader's workers made with ``rebuild_views`` (when set).
    """

    names: Sequence[str]
    """One per teacher (``[K]``): what summary.json, metrics' teacher_weights and messages
    call them (``kdplug.teacher_names``)."""

    specs: Sequence[str] | None = None
    """One per teacher: its spec's text, recorded in summary.json. None: ``names``."""

    known: torch.Tensor
    """``[K, C]`` bool: teacher k can predict class c (used when no row is labeled)."""

    teachers: Sequence[Any] = ()
    """The live teachers; ``distill`` turns off ``requires_grad`` on those that are
    ``torch.nn.Module`` (autocast would keep a low-precision copy of each weight). A store
    has none. Teachers get contiguous inputs; only the student's are channels_last on CUDA."""

    rebuild_views: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    """``rebuild_views(x [B, ...], idx [B], epoch) -> x``: the inputs of the stored view
    each row has in ``epoch`` (a fixed function of the run, the epoch and the row), rebuilt
    from the plain CPU batch ``x`` in the training loader's workers; after ``set_epoch``,
    ``producer`` serves those views' outputs. None: one input per row."""

    request_features: Callable[[str | None, Sequence[int]], str] | None = None
    """``request_features(teacher, stages) -> name``: from then on every output carries the
    features at ``stages`` of the teacher named ``teacher`` (None: the first with
    ``intermediates``) as ``TeacherOutputs.features``; returns its name. None: it has no
    features (a store: its outputs are logits only)."""

    def fingerprints(self) -> list[str | None]:
        """One per teacher: recorded in summary.json."""
        ...

    @optional
    def to(self, device: Any) -> Producer:
        """Move to the run's device before any call; returns the producer."""
        return self

    @optional
    def set_epoch(self, epoch: int) -> None:
        """Called before each training epoch (``epoch`` from 0): serve the outputs of the
        views ``rebuild_views`` gives in it. Default: nothing."""

    @optional
    def check_rows(self, rows: int) -> None:
        """Refuse (``UsageError``) a run of ``rows`` rows that is not what it serves."""

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> TeacherOutputs: ...


PROTOCOLS = (Teacher, Student, LossStrategy, Combiner, LabelGenerator, Producer)


@dataclass(frozen=True)
class Member:
    """One member of a Protocol: required, or optional with the ``default`` assumed."""

    name: str
    required: bool
    default: Any = None


def members(protocol: type) -> dict[str, Member]:
    """The members ``protocol`` declares, in order: attributes (annotated; optional when
    given a value), methods (optional when marked ``@optional``) and ``__call__``."""
    own = vars(protocol)
    annotated = own.get("__annotations__", {})
    found: dict[str, Member] = {}
    for name in [*annotated, *own]:
        if name in found or (name.startswith("_") and name != "__call__"):
            continue
        if name in annotated:
            optional = name in own
        else:
            optional = hasattr(own[name], "__kdplug_optional__")
        found[name] = Member(name, not optional, own[name] if optional else None)
    return found


def missing(obj: Any, protocol: type) -> list[str]:
    """The required members of ``protocol`` that ``obj`` lacks (a plugin's own check)."""
    return [m.name for m in members(protocol).values() if m.required and not _has(obj, m.name)]


def _has(obj: Any, name: str) -> bool:
    """Whether ``obj`` has ``name``; a property that raises (a loss's ``T=auto`` before
    fitting) exists."""
    try:
        getattr(obj, name)
    except AttributeError:
        return False
    except Exception:
        return True
    return True
