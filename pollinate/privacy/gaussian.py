"""The exact epsilon of full-batch DP-SGD, where every step is a plain Gaussian mechanism.

At Poisson sample rate 1 every sample is in every batch, so one DP-SGD step is the Gaussian
mechanism on the sum of clipped per-sample gradients (L2 sensitivity: the clip, add or remove
one sample), and ``s_i`` steps at noise multipliers ``z_i`` compose to ONE Gaussian mechanism of
noise multiplier ``(sum_i s_i / z_i^2) ** -0.5``: the privacy loss of a Gaussian mechanism is
itself Gaussian, and Gaussians compose by adding their ``mu^2`` (Dong, Roth & Su 2019). Its
epsilon at ``delta`` is known in closed form (Balle & Wang 2018), which dp-accounting's analytic
Gaussian accountant solves. That is the exact value, the limit the PLD accountant approaches
from above; RDP's conversion is 5-10 % looser at the epsilons people deploy.

A history with any block below rate 1 (subsampling) has no such closed form: :func:`
exact_epsilon` gives ``None`` and the RDP accountant (:mod:`pollinate.privacy.rdp`) reports it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pollinate._imports import module_from_file
from pollinate.errors import ConfigError
from pollinate.privacy.mechanism import MechanismStep

__all__ = ["exact_epsilon", "exact_noise_multiplier", "full_batch", "gaussian_epsilon"]

#: Relative margin on a solved epsilon (its root found to 1e-12, which is added too) and on a
#: solved noise: a root-finder's last digit never reports less than the exact epsilon.
_MARGIN = 1e-9


@functools.cache
def _gaussian() -> Any:
    """dp-accounting's ``gaussian_mechanism.py``, loaded without the package (whose
    ``__init__`` imports every accountant: about a second)."""
    return module_from_file(
        "dp_accounting", "gaussian_mechanism.py", "pollinate.privacy._dp_gaussian"
    )


def full_batch(history: Sequence[MechanismStep]) -> bool:
    """Whether every block of ``history`` samples at rate 1 (each step a Gaussian mechanism)."""
    return bool(history) and all(entry.sample_rate == 1.0 for entry in history)


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of ONE Gaussian mechanism of ``noise_multiplier``
    (std / L2 sensitivity; > 0), by dp-accounting's analytic Gaussian accountant, with the
    margin that keeps a root-finder's last digit from reporting less than the truth."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # log(0) at the edges
        epsilon = float(_gaussian().get_epsilon_gaussian(noise_multiplier, delta, tol=1e-12))
    return epsilon * (1 + _MARGIN) + 1e-12 if math.isfinite(epsilon) else math.inf


@functools.lru_cache(maxsize=4096)
def _exact(history: tuple[MechanismStep, ...], delta: float) -> float:
    mu_squared = sum(entry.steps / entry.noise_multiplier**2 for entry in history)
    return gaussian_epsilon(1.0 / math.sqrt(mu_squared), delta)


def exact_epsilon(history: Sequence[MechanismStep], delta: float) -> float | None:
    """The exact epsilon at ``delta`` (already checked) of a full-batch ``history`` (see the
    module docstring); ``None`` when a block subsamples, ``0.0`` for an empty history."""
    if not history:
        return 0.0
    if not full_batch(history):
        return None
    return _exact(tuple(history), delta)


def exact_noise_multiplier(
    target_epsilon: float, delta: float, steps: int, *, most: float = math.inf
) -> float:
    """The smallest noise multiplier (to ``1e-6`` relative) whose ``steps`` full-batch steps
    have exact epsilon at most ``target_epsilon`` at ``delta`` (both already checked).

    Raises:
        ConfigError: The target needs a noise multiplier above ``most``.
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # log(0) at the edges
        one = float(_gaussian().get_sigma_gaussian(target_epsilon, delta, tol=1e-12))
    noise = one * math.sqrt(steps) * (1 + _MARGIN)
    for _ in range(100):  # the solver's last digit: nudge up until the reported epsilon fits
        if not noise <= most:
            raise ConfigError(
                f"cannot reach target_epsilon {target_epsilon} at delta {delta:g} with {steps} "
                f"full-batch steps: it needs noise multiplier {noise:.3g}, above {most:g}; "
                "raise the target epsilon or delta"
            )
        step = MechanismStep(noise_multiplier=noise, sample_rate=1.0, steps=steps)
        if _exact((step,), delta) <= target_epsilon:
            return noise
        noise *= 1 + 1e-6
    raise ConfigError(f"cannot calibrate the noise for target_epsilon {target_epsilon}")
