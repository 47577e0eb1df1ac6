"""Option checks shared by the loss strategies; each failure is a UsageError."""

from __future__ import annotations

import math

from kdplug.api import UsageError


def positive(loss: str, option: str, value: float) -> float:
    """``value`` as a float, refused unless finite and > 0."""
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{loss}: {option} must be > 0, got {value}")
    return float(value)


def temperature_or_auto(loss: str, option: str, value: float | str) -> float | None:
    """A temperature > 0, or None for ``auto`` (chosen later on labeled rows)."""
    if isinstance(value, str):
        if value != "auto":
            raise UsageError(f"{loss}: {option} must be > 0 or auto, got {value!r}")
        return None
    if isinstance(value, bool):
        raise UsageError(f"{loss}: {option} must be > 0 or auto, got {value}")
    return positive(loss, option, value)


def non_negative(loss: str, option: str, value: float) -> float:
    """``value`` as a float, refused unless finite and >= 0."""
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{loss}: {option} must be >= 0, got {value}")
    return float(value)


def loss_weights(loss: str, ce_weight: float, kd_weight: float) -> tuple[float, float]:
    """Both weights >= 0 and not both 0 (the total loss would be 0)."""
    ce_weight = non_negative(loss, "ce_weight", ce_weight)
    kd_weight = non_negative(loss, "kd_weight", kd_weight)
    if ce_weight == 0 and kd_weight == 0:
        raise UsageError(f"{loss}: ce_weight and kd_weight cannot both be 0")
    return ce_weight, kd_weight


def integer_at_least(loss: str, option: str, value: int, minimum: int) -> int:
    """``value``, refused unless an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{loss}: {option} must be an integer >= {minimum}, got {value!r}")
    return value
