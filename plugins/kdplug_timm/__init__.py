"""timm students and teachers, and kdplug student directories as teachers.

- student ``timm:ARCH``: any timm architecture, built with the data's classes and channels.
- teacher ``timm:ARCH``: a timm model from ``checkpoint=PATH`` or timm's pretrained weights.
- teacher ``kdplug:DIR``: a student directory written by ``kdplug distill``.

Options and defaults live only in these factories; kdplug_timm.models does the work.
"""

from __future__ import annotations

import kdplug

__version__ = kdplug.__version__


def timm_student(
    ref: str,
    num_classes: int,
    in_chans: int,
    drop_path_rate: float = 0.0,
    drop_rate: float = 0.0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    mean: float | list[float] | None = None,
    std: float | list[float] | None = None,
):
    """A timm architecture with the data's classes and channels (options go to create_model)."""
    from kdplug_timm.models import build_student

    return build_student(
        ref,
        num_classes,
        in_chans,
        drop_path_rate=drop_path_rate,
        drop_rate=drop_rate,
        pretrained=pretrained,
        checkpoint=checkpoint,
        mean=mean,
        std=std,
    )


def timm_teacher(
    ref: str,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained: bool = False,
    classes: str | list[str] | None = None,
    mean: float | list[float] | None = None,
    std: float | list[float] | None = None,
    size: int | list[int] | None = None,
):
    """A timm model from checkpoint=PATH (safetensors or state dict) or pretrained=true.

    Fed size/mean/std as given, else as the checkpoint records them, else as timm's
    pretrained_cfg says (pretrained=true only), else at the data's size and mean/std."""
    from kdplug_timm.models import build_teacher

    return build_teacher(
        ref,
        checkpoint=checkpoint,
        num_classes=num_classes,
        in_chans=in_chans,
        pretrained=pretrained,
        classes=classes,
        mean=mean,
        std=std,
        size=size,
    )


def kdplug_teacher(ref: str):
    """A student directory written by `kdplug distill` (DIR or DIR/student)."""
    from kdplug_timm.models import load_student_teacher

    return load_student_teacher(ref)


@kdplug.hookimpl
def register_students(register):
    register("timm", timm_student)


@kdplug.hookimpl
def register_teachers(register):
    register("timm", timm_teacher)
    register("kdplug", kdplug_teacher)
