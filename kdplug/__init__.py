"""kdplug: knowledge distillation and pseudo-labeling, built as a plugin system.

The public names a plugin is written against are exported here; importing kdplug does
not import torch, timm or scikit-learn.
"""

from kdplug.components import Combiner, LabelGenerator, Labels, LossStrategy, Teacher
from kdplug.errors import KdplugError, PluginError, UsageError
from kdplug.hookspecs import hookimpl, hookspec
from kdplug.run import Run
from kdplug.spec import Spec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "Combiner",
    "KdplugError",
    "LabelGenerator",
    "Labels",
    "LossStrategy",
    "PluginError",
    "Run",
    "Spec",
    "Teacher",
    "UsageError",
    "__version__",
    "hookimpl",
    "hookspec",
    "parse_spec",
]
