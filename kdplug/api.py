"""kdplug's public API for plugin authors: the one module a plugin imports from kdplug.

kdplug's own plugins (``plugins/kdplug_*``) import nothing else from kdplug (a test checks
it), so a third-party plugin can do every job they do with the same names. The names are
grouped below by job; docs/plugins.md ("The plugin API") documents each one.

Importing this module imports no torch, timm, scikit-learn or datasets (``kdplug --help``
and ``kdplug plugins`` import every plugin): each name is looked up in ``GROUPS`` and its
module imported on first use (PEP 562), so ``from kdplug.api import probs_to_logits``
imports ``kdplug.teacher_io`` then, and ``from kdplug.api import UsageError`` imports no
torch at all.
"""

from __future__ import annotations

import importlib
from typing import Any

# group name -> (what the group is for, {public name: "module:attribute"})
GROUPS: dict[str, tuple[str, dict[str, str]]] = {
    "hooks and the contract": (
        "Implementing hooks, and the shapes of the components a plugin registers.",
        {
            "hookimpl": "kdplug.hookspecs:hookimpl",
            "Teacher": "kdplug.components:Teacher",
            "LossStrategy": "kdplug.components:LossStrategy",
            "Combiner": "kdplug.components:Combiner",
            "LabelGenerator": "kdplug.components:LabelGenerator",
            "Student": "kdplug.components:Student",
            "Producer": "kdplug.components:Producer",
            "missing": "kdplug.components:missing",
            "Labels": "kdplug.components:Labels",
            "ShardRows": "kdplug.label_shards:ShardRows",
            "LabelShards": "kdplug.label_shards:LabelShards",
            "StreamingGenerator": "kdplug.label_shards:StreamingGenerator",
            "hard_labels": "kdplug.label_shards:hard_labels",
            "Run": "kdplug.run:Run",
            "create_component": "kdplug.plugins:create",
            "model_intermediates": "kdplug.features:model_intermediates",
            "Progress": "kdplug.progress:Progress",
        },
    ),
    "errors": (
        "What a plugin raises, and how it quotes an exception in one line.",
        {
            "KdplugError": "kdplug.errors:KdplugError",
            "UsageError": "kdplug.errors:UsageError",
            "PluginError": "kdplug.errors:PluginError",
            "BadRowsError": "kdplug.errors:BadRowsError",
            "UntrustedTypes": "kdplug.errors:UntrustedTypes",
            "describe": "kdplug.errors:describe",
        },
    ),
    "specs": (
        "Reading and writing spec strings (NAME[:REF][,key=value,...]).",
        {
            "Spec": "kdplug.spec:Spec",
            "parse_spec": "kdplug.spec:parse_spec",
            "quote": "kdplug.spec:quote",
            "quote_list": "kdplug.spec:quote_list",
            "path_source": "kdplug.data_paths:path_source",
        },
    ),
    "teacher files": (
        "Checking a teacher's file and options, loading it safely, turning outputs into logits.",
        {
            "existing_file": "kdplug.teacher_io:existing_file",
            "file_hash": "kdplug.file_hashes:file_hash",
            "class_names": "kdplug.teacher_io:class_names",
            "probability_flag": "kdplug.teacher_io:probability_flag",
            "preprocess": "kdplug.teacher_io:preprocess",
            "spec_inputs": "kdplug.teacher_io:spec_inputs",
            "shape_defaults": "kdplug.teacher_io:shape_defaults",
            "Preprocess": "kdplug.preprocess:Preprocess",
            "fixed_batch": "kdplug.teacher_io:fixed_batch",
            "run_in_batches": "kdplug.teacher_io:run_in_batches",
            "to_device": "kdplug.teacher_io:to_device",
            "probs_to_logits": "kdplug.teacher_io:probs_to_logits",
            "looks_like_probs": "kdplug.teacher_io:looks_like_probs",
            "PICKLE_SUFFIXES": "kdplug.teacher_io:PICKLE_SUFFIXES",
            "pickle_allowed": "kdplug.teacher_io:pickle_allowed",
            "refuse_pickle": "kdplug.teacher_io:refuse_pickle",
            "code_allowed": "kdplug.teacher_io:code_allowed",
            "refuse_code": "kdplug.teacher_io:refuse_code",
            "weights_only_loads": "kdplug.teacher_io:weights_only_loads",
        },
    ),
    "tensor ops": (
        "Logits with classes a teacher does not know, tempering, z-scores, weights.",
        {
            "IMPOSSIBLE": "kdplug.ops:IMPOSSIBLE",
            "masked_log_softmax": "kdplug.ops:masked_log_softmax",
            "teacher_probs": "kdplug.ops:teacher_probs",
            "standardize": "kdplug.ops:standardize",
            "entropy": "kdplug.ops:entropy",
            "argmax": "kdplug.ops:argmax",
            "normalize_weights": "kdplug.ops:normalize_weights",
        },
    ),
    "metrics": (
        "Scores of probabilities against labels (-1 rows ignored), as the reports compute them.",
        {
            "accuracy": "kdplug.metrics:accuracy",
            "nll": "kdplug.metrics:nll",
            "ece": "kdplug.metrics:ece",
        },
    ),
    "fitting & calibration": (
        "What a component's fit(...) on the labeled rows uses.",
        {
            "one_thread": "kdplug.fitting:one_thread",
            "split_folds": "kdplug.fitting:split_folds",
            "fixed_sample": "kdplug.fitting:fixed_sample",
            "choose_temperature": "kdplug.fitting:choose_temperature",
            "apply_temperature": "kdplug.calibration:apply_temperature",
            "fit_temperature": "kdplug.calibration:fit_temperature",
        },
    ),
    "store": (
        "Reading a finished store of teacher outputs (kdplug cache).",
        {
            "open_store": "kdplug.store.reader:open_store",
            "Store": "kdplug.store.reader:Store",
            "Split": "kdplug.store.reader:Split",
            "STORE_FILE": "kdplug.store.layout:STORE_FILE",
        },
    ),
    "student directory": (
        "kdplug's format for a trained student (a timm model), as distill writes it.",
        {
            "STUDENT_CONFIG": "kdplug.model_dir:CONFIG",
            "STUDENT_WEIGHTS": "kdplug.model_dir:WEIGHTS",
            "student_path": "kdplug.model_dir:student_path",
            "read_student_config": "kdplug.model_dir:read_config",
            "load_student": "kdplug.model_dir:load_student",
            "student_preprocess": "kdplug.model_dir:student_preprocess",
        },
    ),
}

_TARGETS = {name: target for _, names in GROUPS.values() for name, target in names.items()}

__all__ = sorted(_TARGETS)


def __getattr__(name: str) -> Any:
    """Import the module behind ``name`` now, on first use (PEP 562)."""
    target = _TARGETS.get(name)
    if target is None:
        raise AttributeError(f"module 'kdplug.api' has no attribute {name!r}")
    module, attribute = target.split(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
