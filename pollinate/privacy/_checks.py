"""Argument checks shared by the accountant and the ledger (private to pollinate.privacy).

Each check returns the value normalised (a float or an int) or raises :class:`ConfigError`
with a message naming the parameter. A bool is never accepted as a number.
"""

from __future__ import annotations

import math
from typing import TypeGuard

from pollinate.errors import ConfigError

__all__ = [
    "check_delta",
    "check_integer",
    "check_noise",
    "check_number",
    "check_rate",
    "check_steps",
    "check_text",
    "is_number",
]


def is_number(value: object) -> TypeGuard[int | float]:
    """True for an int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_delta(delta: object) -> float:
    """Return ``delta`` as a float, or raise :class:`ConfigError` unless 0 < delta < 1."""
    if not is_number(delta) or not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


# ---------------------------------------------------------------- DP-SGD mechanism


def check_noise(noise_multiplier: object) -> float:
    """Return the noise multiplier as a float, or raise unless it is finite and > 0."""
    if (
        not is_number(noise_multiplier)
        or not math.isfinite(noise_multiplier)
        or noise_multiplier <= 0
    ):
        raise ConfigError(
            f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r} "
            "(a noise multiplier of 0 gives no differential privacy)"
        )
    return float(noise_multiplier)


def check_rate(sample_rate: object) -> float:
    """Return the sample rate as a float, or raise unless 0 < rate <= 1."""
    if not is_number(sample_rate) or not 0.0 < sample_rate <= 1.0:
        raise ConfigError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def check_steps(steps: object) -> int:
    """Return the step count, or raise unless it is an int >= 1."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


# ---------------------------------------------------------------- named fields


def check_number(name: str, value: object, *, low: float, low_open: bool, allow_inf: bool) -> float:
    """Validate a number against a lower bound and return it as float."""
    if not is_number(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if number < low or (low_open and number == low):
        relation = ">" if low_open else ">="
        raise ConfigError(f"{name} must be {relation} {low:g}, got {value!r}")
    return number


def check_integer(name: str, value: object, *, low: int) -> int:
    """Validate an int (not a bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_text(name: str, value: object) -> str:
    """Validate a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value
