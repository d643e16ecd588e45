"""Budget calibration: the noise multiplier that meets a target epsilon.

The inverse of the accountant: given a target epsilon, delta, sample rate and step count,
:func:`noise_multiplier_for_budget` finds the smallest noise multiplier that stays within the
target under the accountant that will report it: the exact Gaussian epsilon at sample rate 1
(:mod:`pollinate.privacy.gaussian`), Opacus' RDP accountant otherwise.
"""

from __future__ import annotations

import math

from pollinate.errors import ConfigError
from pollinate.privacy._checks import check_delta, check_rate, check_steps, is_number
from pollinate.privacy.gaussian import exact_noise_multiplier

__all__ = ["noise_multiplier_for_budget"]

_EPSILON_TOLERANCE = 0.01
#: the largest noise multiplier a target may call for (client-level calibration's bound too)
_MAX_NOISE = 1e4


def noise_multiplier_for_budget(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The smallest noise multiplier whose ``steps`` steps at ``sample_rate`` stay within budget.

    At sample rate 1 (full batch) the steps are one Gaussian mechanism, solved exactly: the
    result's exact epsilon is at most ``target_epsilon`` and within 1e-7 of it. Otherwise
    Opacus' binary search with the RDP accountant (epsilon tolerance 0.01): an epsilon at most
    ``target_epsilon`` and at most 0.01 below it.

    Raises:
        ConfigError: If a parameter is invalid or the target cannot be reached with any
            reasonable noise multiplier.
    """
    if (
        not is_number(target_epsilon)
        or not math.isfinite(float(target_epsilon))
        or target_epsilon <= 0
    ):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = check_delta(delta)
    sample_rate = check_rate(sample_rate)
    steps = check_steps(steps)
    if sample_rate == 1.0:  # one Gaussian mechanism: solved exactly
        return exact_noise_multiplier(float(target_epsilon), delta, steps, most=_MAX_NOISE)
    from opacus.accountants.utils import get_noise_multiplier  # heavy: only when calibrating

    try:
        sigma = get_noise_multiplier(
            target_epsilon=float(target_epsilon),
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=_EPSILON_TOLERANCE,
        )
    except ValueError as exc:
        raise ConfigError(
            f"cannot reach target_epsilon {target_epsilon} at delta {delta:g} with "
            f"{steps} steps at sample rate {sample_rate:g}: {exc}"
        ) from exc
    return float(sigma)
