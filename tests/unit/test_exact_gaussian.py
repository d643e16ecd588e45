"""Full-batch DP-SGD accounted exactly: against dp-accounting's PLD accountant (independent,
fine discretization), the Gaussian mechanism's delta written out here, and Opacus' RDP."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from pollinate.errors import ConfigError
from pollinate.privacy import ClientAccountant, MechanismStep, noise_multiplier_for_budget
from pollinate.privacy.rdp import epsilon_of

pytestmark = pytest.mark.unit

HISTORIES = [
    [MechanismStep(1.427, 1.0, 5)],
    [MechanismStep(0.8, 1.0, 1), MechanismStep(2.5, 1.0, 7), MechanismStep(1.1, 1.0, 3)],
    [MechanismStep(5.0, 1.0, 40)],
]


def _pld_fine(history: list[MechanismStep], delta: float) -> float:
    import dp_accounting
    from dp_accounting import pld

    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    for block in history:
        accountant.compose(dp_accounting.GaussianDpEvent(block.noise_multiplier), block.steps)
    return float(accountant.get_epsilon(delta))


def _exact_delta(history: list[MechanismStep], epsilon: float) -> float:
    """Balle & Wang (2018): the delta of the Gaussian mechanism of ``mu = sum(s / z^2)^0.5``
    at ``epsilon``, the whole history being that one mechanism."""
    mu = math.sqrt(sum(b.steps / b.noise_multiplier**2 for b in history))
    return float(
        norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)
    )


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_a_full_batch_history_reports_the_exact_epsilon(
    history: list[MechanismStep], delta: float
) -> None:
    accountant = ClientAccountant(history)
    reported = accountant.epsilon(delta)
    rdp, exact = accountant.epsilons(delta)
    assert exact is not None and reported == exact < rdp == epsilon_of(history, delta)
    # never below the truth: at the reported epsilon the mechanism's delta is within target
    assert _exact_delta(history, reported) <= delta
    # and not loose: a hair below it, the delta is exceeded
    assert _exact_delta(history, reported * (1 - 1e-6)) > delta
    # the PLD accountant (pessimistic by its discretization) agrees from above
    fine = _pld_fine(history, delta)
    assert fine * (1 - 1e-3) <= reported <= fine * (1 + 1e-8)


def test_one_subsampled_block_leaves_the_history_to_rdp() -> None:
    history = [MechanismStep(1.0, 1.0, 3), MechanismStep(1.0, 0.25, 8)]
    accountant = ClientAccountant(history)
    assert accountant.epsilons(1e-5) == (epsilon_of(history, 1e-5), None)
    assert accountant.epsilon(1e-5) == epsilon_of(history, 1e-5)


@pytest.mark.parametrize("target", [0.5, 1.0, 2.0, 8.0])
def test_full_batch_calibration_meets_the_target_with_the_reporting_accountant(
    target: float,
) -> None:
    noise = noise_multiplier_for_budget(target_epsilon=target, delta=1e-5, sample_rate=1.0, steps=5)
    accountant = ClientAccountant()
    for _ in range(5):  # five rounds of one full-batch step, as the sample workload runs
        accountant.record(MechanismStep(noise, 1.0, 1))
    spent = accountant.epsilon(1e-5)
    assert target * (1 - 1e-5) <= spent <= target
    # less noise than Opacus' RDP calibration asks for the same target
    from opacus.accountants.utils import get_noise_multiplier

    rdp_noise = get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=1.0, steps=5, accountant="rdp"
    )
    assert noise < rdp_noise


def test_an_unreachable_full_batch_target_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot reach target_epsilon 1e-12 .* above 10000"):
        noise_multiplier_for_budget(target_epsilon=1e-12, delta=1e-5, sample_rate=1.0, steps=1)


def test_the_exact_accountant_loads_without_dp_accountings_package() -> None:
    """dp-accounting's ``__init__`` imports every accountant (about a second): the full-batch
    epsilon loads only its Gaussian module, and a missing package is one clear ImportError."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pollinate.privacy import ClientAccountant, MechanismStep\n"
        "eps = ClientAccountant([MechanismStep(1.0, 1.0, 4)]).epsilon(1e-5)\n"
        "assert 0 < eps < 20, eps\n"
        "print(sorted(m for m in sys.modules if m.startswith(('dp_accounting', 'opacus'))))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"

    from pollinate._imports import module_from_file

    with pytest.raises(ImportError, match="no_such_package is not installed"):
        module_from_file("no_such_package", "x.py", "pollinate._x")
