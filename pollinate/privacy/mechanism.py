"""The unit of sample-level accounting: one block of DP-SGD steps (:class:`MechanismStep`).

A client's privacy history is a sequence of these blocks; :mod:`pollinate.privacy.rdp` turns a
history into epsilon and :class:`~pollinate.privacy.accountant.ClientAccountant` keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.privacy._checks import check_noise, check_rate, check_steps

__all__ = ["MechanismStep"]


@dataclass(frozen=True)
class MechanismStep:
    """One composition block of DP-SGD: ``steps`` steps of the sampled Gaussian mechanism.

    Attributes:
        noise_multiplier: Ratio of the noise standard deviation to the clipping norm; > 0.
        sample_rate: Poisson sampling probability of each example per step; in (0, 1].
        steps: Number of optimizer steps run with these parameters; >= 1.

    Raises:
        ConfigError: If any parameter is out of range or of the wrong type.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        """Validate the parameters and normalise the numbers to float."""
        object.__setattr__(self, "noise_multiplier", check_noise(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_rate(self.sample_rate))
        object.__setattr__(self, "steps", check_steps(self.steps))
