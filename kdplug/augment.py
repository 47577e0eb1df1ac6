"""Training augmentation for ``distill --augment``: timm's ``create_transform`` and ``Mixup``.

``--augment`` alone uses timm's training transform with its defaults; ``--augment
"KEY=VALUE,..."`` sets options. Transform keys go to ``timm.data.create_transform``
(``scale``, ``ratio``, ``hflip``, ``vflip``, ``color_jitter``, ``auto_augment``, ``re_prob``,
``interpolation``); ``mixup``, ``cutmix`` (alphas) and ``label_smoothing`` go to
``timm.data.Mixup``. Images stay in ``[0, 1]``: teachers and student see the same view.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdplug.errors import UsageError
from kdplug.spec import parse_spec

TRANSFORM_KEYS = (
    "scale",
    "ratio",
    "hflip",
    "vflip",
    "color_jitter",
    "auto_augment",
    "re_prob",
    "interpolation",
)
MIXUP_KEYS = {
    "mixup": "mixup_alpha",
    "cutmix": "cutmix_alpha",
    "label_smoothing": "label_smoothing",
}
DEFAULT = "default"


def parse_augment(text: str | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``--augment`` text -> (create_transform options, Mixup options), None when off."""
    if text is None:
        return None
    text = str(text).strip()
    if text.lower() in ("", DEFAULT, "true", "yes", "on"):
        return {}, {}
    options = parse_spec(f"augment,{text}").options
    unknown = sorted(set(options) - set(TRANSFORM_KEYS) - set(MIXUP_KEYS))
    if unknown:
        known = ", ".join([*TRANSFORM_KEYS, *MIXUP_KEYS])
        raise UsageError(f"--augment: unknown option(s) {', '.join(unknown)} (known: {known})")
    for key in ("scale", "ratio"):
        if key in options:
            if not isinstance(options[key], list) or len(options[key]) != 2:
                raise UsageError(
                    f"--augment: {key} must be two numbers like 0.5;1, got {options[key]}"
                )
            options[key] = tuple(float(v) for v in options[key])
    transform = {k: v for k, v in options.items() if k in TRANSFORM_KEYS}
    mixup = {MIXUP_KEYS[k]: float(v) for k, v in options.items() if k in MIXUP_KEYS}
    for key, value in mixup.items():
        if not 0 <= value < (1 if key == "label_smoothing" else float("inf")):
            raise UsageError(f"--augment: {key} out of range, got {value}")
    if mixup and not (mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0):
        mixup = {}
    return transform, mixup


class Augment:
    """timm's training transform of one decoded image (PIL, L or RGB, at its own size; or
    float32 ``[C, H, W]`` in [0, 1]) -> float32 ``[C, H, W]`` in [0, 1] of the data's size.

    ``kdplug.data`` calls it in the loader's workers, on each image as decoded (before any
    resize), as timm's own loaders do; ``kdplug.data.seeded`` seeds it per batch.
    """

    def __init__(self, input_shape: tuple[int, int, int], options: dict[str, Any]):
        from timm.data import create_transform

        channels = input_shape[0]
        try:
            self.transform = create_transform(
                tuple(input_shape),
                is_training=True,
                mean=(0.0,) * channels,
                std=(1.0,) * channels,
                **options,
            )
        except (TypeError, ValueError, AssertionError) as exc:
            raise UsageError(f"--augment: timm rejected the options {options} ({exc})") from None
        from torchvision.transforms import Normalize

        steps = self.transform.transforms  # Normalize by mean 0, std 1 is a copy: dropped
        self.transform.transforms = [t for t in steps if not isinstance(t, Normalize)]
        # only random erasing (re_prob) may leave [0, 1]
        self.erasing = any(type(t).__name__ == "RandomErasing" for t in steps)

    def __call__(self, image: Any) -> np.ndarray:
        if isinstance(image, np.ndarray):
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(torch.from_numpy(image))
        x = self.transform(image)
        return (x.clamp_(0, 1) if self.erasing else x).numpy()


class MixupLabels:
    """timm's batch Mixup/CutMix for partly labeled batches.

    Row ``i`` is mixed with row ``B - 1 - i``; its soft CE target is used only where both rows
    are labeled. Returns ``(x, soft [B, C], valid [B] bool)``; a batch of odd size is left as is.
    """

    def __init__(self, options: dict[str, Any], num_classes: int):
        from timm.data import Mixup

        self.num_classes = num_classes
        self.mixup = Mixup(mode="batch", num_classes=num_classes, **options)

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if len(x) % 2:
            return x, None, None
        valid = (labels >= 0) & (labels.flip(0) >= 0)
        x, soft = self.mixup(x, labels.clamp_min(0))
        return x, soft, valid
