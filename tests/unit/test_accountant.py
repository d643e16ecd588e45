"""Tests of pollinate.privacy.accountant: the per-client sample-level accountant."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant, compute_epsilon
from flwr.app import ConfigRecord
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opacus.accountants.rdp import RDPAccountant

from pollinate.errors import ConfigError, PrivacyBudgetError
from pollinate.privacy import ClientAccountant, MechanismStep, noise_multiplier_for_budget

pytestmark = pytest.mark.unit

DELTA = 1e-5
ORDERS = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
IS_INTEGER = np.mod(ORDERS, 1.0) == 0.0
INTEGER_ORDERS = ORDERS[IS_INTEGER]
FRACTIONAL_ORDERS = ORDERS[~IS_INTEGER]


# ---------------------------------------------------------------- independent reference


def _quadrature_rdp(noise: float, rate: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one step of the sampled Gaussian at ``orders``, by quadrature.

    dp_accounting 0.6.0 is exact at integer orders, but its series for fractional orders stops
    early: it overestimates (by several percent at q ~ 0.5) or gives up and drops the order
    (logging "failed to converge"). So the reference integrates
    ``A_alpha = E_{z ~ N(0, s^2)} [((1 - q) + q exp((2z - 1) / (2 s^2)))^alpha]``
    (Mironov et al. 2019) directly on a fine grid; this agrees with the closed forms at integer
    orders to ~1e-12.
    """
    if rate == 1.0:
        return orders / (2.0 * noise**2)
    z = np.linspace(-15.0 * noise - 1.0, orders.max() + 15.0 * noise + 1.0, 6001)
    log_ratio = np.logaddexp(math.log1p(-rate), math.log(rate) + (2.0 * z - 1.0) / (2 * noise**2))
    log_mu0 = -(z**2) / (2.0 * noise**2) - math.log(noise * math.sqrt(2.0 * math.pi))
    log_integrand = log_mu0[None, :] + orders[:, None] * log_ratio[None, :]
    peak = log_integrand.max(axis=1, keepdims=True)
    integral = np.trapezoid(np.exp(log_integrand - peak), z, axis=1)
    result: np.ndarray = (peak[:, 0] + np.log(integral)) / (orders - 1.0)
    return result


def _event(step: MechanismStep) -> dp_accounting.DpEvent:
    """The dp_accounting event of one composition block."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            step.sample_rate, dp_accounting.GaussianDpEvent(step.noise_multiplier)
        ),
        step.steps,
    )


def _google_epsilon(history: list[MechanismStep], delta: float, orders: np.ndarray) -> float:
    """Epsilon of ``history`` from Google's dp_accounting RDP accountant at ``orders``."""
    accountant = RdpAccountant(orders=list(orders))
    accountant.compose(dp_accounting.ComposedDpEvent([_event(step) for step in history]))
    return float(accountant.get_epsilon(delta))


def reference_epsilon(history: list[MechanismStep], delta: float) -> float:
    """Epsilon over Opacus' default orders, independently of Opacus.

    Integer orders: dp_accounting's RDP accountant. Fractional orders: quadrature, converted
    with dp_accounting's ``compute_epsilon``. The conversion is a minimum over orders, so the
    minimum of the two parts is the epsilon over all orders.
    """
    integer_part = _google_epsilon(history, delta, INTEGER_ORDERS)
    rdp = sum(
        step.steps * _quadrature_rdp(step.noise_multiplier, step.sample_rate, FRACTIONAL_ORDERS)
        for step in history
    )
    fractional_part, _ = compute_epsilon(FRACTIONAL_ORDERS, rdp, delta)
    epsilon = min(integer_part, float(fractional_part))
    if epsilon == 0.0:
        # dp_accounting also applies a total-variation bound ((0, delta)-DP once the RDP is
        # below about delta**2) that Opacus does not use. Then compare with the plain
        # conversion (Balle et al. 2020, Thm 21, as in both libraries) of the same RDP curve.
        rdp_all = sum(
            step.steps * _quadrature_rdp(step.noise_multiplier, step.sample_rate, ORDERS)
            for step in history
        )
        conversion = rdp_all + np.log1p(-1.0 / ORDERS) - np.log(delta * ORDERS) / (ORDERS - 1.0)
        epsilon = float(np.min(conversion))
    return epsilon


# ---------------------------------------------------------------- strategies

noises = st.floats(min_value=0.5, max_value=5.0)
rates = st.floats(min_value=0.001, max_value=1.0)
deltas = st.floats(min_value=1e-7, max_value=1e-3)
mechanism_steps = st.builds(
    MechanismStep,
    noise_multiplier=noises,
    sample_rate=rates,
    steps=st.integers(min_value=1, max_value=500),
)


# ---------------------------------------------------------------- epsilon vs dp_accounting


@settings(max_examples=30, deadline=None)
@given(step=mechanism_steps, delta=deltas)
@example(  # dp_accounting's fractional-order series does not converge here
    step=MechanismStep(noise_multiplier=0.5, sample_rate=0.5, steps=500), delta=1e-5
)
@example(  # dp_accounting's total-variation bound gives 0; Opacus does not use it
    step=MechanismStep(noise_multiplier=3.0, sample_rate=0.00390625, steps=1), delta=1e-3
)
def test_epsilon_matches_reference_single_block(step: MechanismStep, delta: float) -> None:
    accountant = ClientAccountant([step])
    rdp, exact = accountant.epsilons(delta)
    assert rdp == pytest.approx(reference_epsilon([step], delta), rel=0.01)
    # reported: the tighter, where a full batch makes the exact epsilon known
    assert accountant.epsilon(delta) == (rdp if exact is None else min(rdp, exact))


@settings(max_examples=25, deadline=None)
@given(history=st.lists(mechanism_steps, min_size=2, max_size=3), delta=deltas)
def test_epsilon_matches_reference_across_rounds(
    history: list[MechanismStep], delta: float
) -> None:
    accountant = ClientAccountant()
    for step in history:
        accountant.record(step)
    rdp, exact = accountant.epsilons(delta)
    assert rdp == pytest.approx(reference_epsilon(history, delta), rel=0.01)
    assert accountant.epsilon(delta) == (rdp if exact is None else min(rdp, exact))
    assert (exact is None) == any(step.sample_rate < 1 for step in history)


@pytest.mark.parametrize(
    ("noise", "rate", "steps"),
    [(1.1, 0.01, 1000), (0.8, 0.004, 250), (2.0, 1.0, 3)],
)
def test_epsilon_matches_dp_accounting_integer_orders_typical(
    noise: float, rate: float, steps: int
) -> None:
    """In the usual DP-SGD regime the optimum is at an integer order: plain dp_accounting.
    (At sample rate 1 the reported epsilon is the exact one, below RDP's.)"""
    step = MechanismStep(noise_multiplier=noise, sample_rate=rate, steps=steps)
    rdp, exact = ClientAccountant([step]).epsilons(DELTA)
    assert rdp == pytest.approx(_google_epsilon([step], DELTA, ORDERS), rel=0.01)
    reported = ClientAccountant([step]).epsilon(DELTA)
    assert reported == (rdp if exact is None else min(rdp, exact))
    assert (exact is None) == (rate < 1)


@pytest.mark.parametrize(
    ("noise", "rate", "steps"),
    [(0.5, 0.5, 500), (4.165, 0.54, 494), (1.0, 0.01, 100)],
)
def test_plain_dp_accounting_is_never_tighter(noise: float, rate: float, steps: int) -> None:
    """dp_accounting alone over the same orders is exact at integer orders and conservative
    (or drops the order) at fractional ones, so it may only be looser than us."""
    step = MechanismStep(noise_multiplier=noise, sample_rate=rate, steps=steps)
    ours, _ = ClientAccountant([step]).epsilons(DELTA)  # the RDP one (all rates below 1 here)
    assert ours <= _google_epsilon([step], DELTA, ORDERS) * (1 + 1e-9)
    assert ours == pytest.approx(reference_epsilon([step], DELTA), rel=1e-4)


def test_epsilon_is_exactly_opacus_rdp_accountant() -> None:
    """The cached computation is bitwise what Opacus' RDPAccountant reports."""
    history = [
        MechanismStep(noise_multiplier=1.1, sample_rate=0.01, steps=300),
        MechanismStep(noise_multiplier=0.9, sample_rate=0.3, steps=7),
        MechanismStep(noise_multiplier=1.1, sample_rate=0.01, steps=50),
        MechanismStep(noise_multiplier=3.0, sample_rate=1.0, steps=2),
    ]
    opacus_accountant = RDPAccountant()
    opacus_accountant.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history]
    for delta in (1e-7, 1e-5, 1e-3):
        assert ClientAccountant(history).epsilon(delta) == opacus_accountant.get_epsilon(delta)


def test_epsilon_without_the_opacus_package_is_opacus_own() -> None:
    """In a fresh interpreter pollinate's accountant computes epsilon without importing the
    ``opacus`` package (its import costs seconds of start-up), with Opacus' orders and
    Opacus' analysis code: the value is bitwise what RDPAccountant reports."""
    code = (
        "import json, sys\n"
        "from pollinate.privacy import ClientAccountant, MechanismStep\n"
        "from pollinate.privacy.rdp import _ORDERS\n"
        "h = [MechanismStep(noise_multiplier=1.1, sample_rate=0.01, steps=300),\n"
        "     MechanismStep(noise_multiplier=0.9, sample_rate=0.3, steps=7)]\n"
        "eps = ClientAccountant(h).epsilon(1e-5)\n"
        "print(json.dumps({'eps': eps, 'orders': _ORDERS,\n"
        "                  'opacus': sorted(m for m in sys.modules if m.startswith('opacus'))}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["opacus"] == []
    assert out["orders"] == list(RDPAccountant.DEFAULT_ALPHAS)
    reference = RDPAccountant()
    reference.history = [(1.1, 0.01, 300), (0.9, 0.3, 7)]
    assert out["eps"] == reference.get_epsilon(1e-5)


def test_empty_history_has_zero_epsilon() -> None:
    accountant = ClientAccountant()
    assert accountant.epsilon(DELTA) == 0.0
    assert accountant.total_steps == 0
    assert accountant.history == ()


@pytest.mark.parametrize("delta", [0, 1, -1e-5, 1.5, math.nan, True, "1e-5"])
def test_invalid_delta_raises(delta: object) -> None:
    accountant = ClientAccountant([MechanismStep(noise_multiplier=1.0, sample_rate=0.1, steps=1)])
    with pytest.raises(ConfigError, match="delta"):
        accountant.epsilon(delta)  # type: ignore[arg-type]


# ---------------------------------------------------------------- mechanism step


@pytest.mark.parametrize(
    ("noise", "rate", "steps"),
    [
        (0.0, 0.1, 1),
        (-1.0, 0.1, 1),
        (math.inf, 0.1, 1),
        (math.nan, 0.1, 1),
        (1.0, 0.0, 1),
        (1.0, 1.5, 1),
        (1.0, math.nan, 1),
        (1.0, 0.1, 0),
        (1.0, 0.1, 1.0),
        (1.0, 0.1, True),
        ("1.0", 0.1, 1),
    ],
)
def test_mechanism_step_validates(noise: object, rate: object, steps: object) -> None:
    with pytest.raises(ConfigError):
        MechanismStep(noise_multiplier=noise, sample_rate=rate, steps=steps)  # type: ignore[arg-type]


def test_mechanism_step_normalises_ints_to_float() -> None:
    step = MechanismStep(noise_multiplier=1, sample_rate=1, steps=5)
    assert isinstance(step.noise_multiplier, float)
    assert isinstance(step.sample_rate, float)
    assert step == MechanismStep(noise_multiplier=1.0, sample_rate=1.0, steps=5)


# ---------------------------------------------------------------- composition across rounds


def test_recording_round_by_round_equals_one_block() -> None:
    per_round = MechanismStep(noise_multiplier=1.2, sample_rate=0.02, steps=50)
    accountant = ClientAccountant()
    for _ in range(6):
        accountant.record(per_round)
    whole = ClientAccountant([MechanismStep(noise_multiplier=1.2, sample_rate=0.02, steps=300)])
    assert accountant.history == whole.history  # merged into one block
    assert accountant.total_steps == 300
    assert accountant.epsilon(DELTA) == whole.epsilon(DELTA)


def test_state_round_trip_each_round_equals_single_accountant() -> None:
    """A client restoring its accountant from Context.state every round loses nothing."""
    rounds = [
        MechanismStep(noise_multiplier=1.0, sample_rate=0.05, steps=20),
        MechanismStep(noise_multiplier=1.0, sample_rate=0.04, steps=25),
        MechanismStep(noise_multiplier=0.9, sample_rate=0.04, steps=25),
        MechanismStep(noise_multiplier=0.9, sample_rate=0.04, steps=10),
    ]
    state = ConfigRecord(ClientAccountant().to_record())  # type: ignore[arg-type]
    epsilons = []
    for step in rounds:
        accountant = ClientAccountant.from_record(state)
        accountant.record(step)
        state = ConfigRecord(accountant.to_record())  # type: ignore[arg-type]
        epsilons.append(accountant.epsilon(DELTA))
    final = ClientAccountant.from_record(state)
    single = ClientAccountant()
    for step in rounds:
        single.record(step)
    assert final == single
    assert final.total_steps == sum(step.steps for step in rounds)
    assert len(final.history) == 3  # the last two rounds merged
    assert final.epsilon(DELTA) == single.epsilon(DELTA)
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] > epsilons[0]
    # A fresh accountant per round would report only the last round: strictly less.
    assert ClientAccountant([rounds[-1]]).epsilon(DELTA) < epsilons[-1]


@settings(max_examples=10, deadline=None)
@given(history=st.lists(mechanism_steps, min_size=1, max_size=4), delta=deltas)
def test_epsilon_is_monotone_across_rounds(history: list[MechanismStep], delta: float) -> None:
    accountant = ClientAccountant()
    previous = 0.0
    for step in history:
        projected = accountant.projected_epsilon(step, delta)
        accountant.record(step)
        current = accountant.epsilon(delta)
        assert current == pytest.approx(projected, rel=1e-9)
        assert current >= previous
        previous = current


def test_projected_epsilon_does_not_record() -> None:
    accountant = ClientAccountant([MechanismStep(noise_multiplier=1.0, sample_rate=0.1, steps=10)])
    before = accountant.history
    step = MechanismStep(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    projected = accountant.projected_epsilon(step, DELTA)
    assert accountant.history == before
    assert projected > accountant.epsilon(DELTA)


def test_record_keeps_distinct_blocks() -> None:
    accountant = ClientAccountant()
    accountant.record(MechanismStep(noise_multiplier=1.0, sample_rate=0.1, steps=3))
    accountant.record(MechanismStep(noise_multiplier=1.0, sample_rate=0.2, steps=4))
    accountant.record(MechanismStep(noise_multiplier=1.0, sample_rate=0.1, steps=5))
    assert [entry.steps for entry in accountant.history] == [3, 4, 5]
    assert accountant.total_steps == 12


# ---------------------------------------------------------------- budget


def test_check_budget_returns_projected_within_budget() -> None:
    accountant = ClientAccountant(
        [MechanismStep(noise_multiplier=1.0, sample_rate=0.01, steps=100)]
    )
    step = MechanismStep(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    projected = accountant.projected_epsilon(step, DELTA)
    assert accountant.check_budget(step, delta=DELTA, budget=projected) == projected
    assert accountant.check_budget(step, delta=DELTA, budget=projected + 1) == projected
    assert accountant.total_steps == 100  # checking records nothing


def test_check_budget_raises_when_projected_exceeds_budget() -> None:
    accountant = ClientAccountant(
        [MechanismStep(noise_multiplier=1.0, sample_rate=0.01, steps=100)]
    )
    step = MechanismStep(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    current = accountant.epsilon(DELTA)
    projected = accountant.projected_epsilon(step, DELTA)
    budget = (current + projected) / 2
    with pytest.raises(PrivacyBudgetError) as info:
        accountant.check_budget(step, delta=DELTA, budget=budget)
    message = str(info.value)
    assert f"{current:.4f}" in message
    assert f"{projected:.4f}" in message
    assert f"{budget:.4f}" in message
    assert accountant.total_steps == 100


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf])
def test_check_budget_without_budget(budget: float) -> None:
    accountant = ClientAccountant()
    step = MechanismStep(noise_multiplier=0.5, sample_rate=1.0, steps=500)
    assert accountant.check_budget(step, delta=DELTA, budget=budget) == pytest.approx(
        accountant.projected_epsilon(step, DELTA)
    )


@pytest.mark.parametrize("budget", [math.nan, "1.0", None])
def test_check_budget_rejects_invalid_budget(budget: object) -> None:
    step = MechanismStep(noise_multiplier=1.0, sample_rate=0.1, steps=1)
    with pytest.raises(ConfigError, match="budget"):
        ClientAccountant().check_budget(step, delta=DELTA, budget=budget)  # type: ignore[arg-type]


# ---------------------------------------------------------------- record and JSON


HISTORY = [
    MechanismStep(noise_multiplier=1.1, sample_rate=0.015625, steps=64),
    MechanismStep(noise_multiplier=0.7000000000000001, sample_rate=0.1, steps=3),
    MechanismStep(noise_multiplier=2.0, sample_rate=1.0, steps=1),
]


def test_record_round_trip_is_exact() -> None:
    accountant = ClientAccountant(HISTORY)
    record = accountant.to_record()
    assert record == {
        "noise": [1.1, 0.7000000000000001, 2.0],
        "rate": [0.015625, 0.1, 1.0],
        "steps": [64, 3, 1],
    }
    via_flower = ClientAccountant.from_record(ConfigRecord(record))  # type: ignore[arg-type]
    assert via_flower == accountant
    assert via_flower.epsilon(DELTA) == accountant.epsilon(DELTA)
    empty = ConfigRecord(ClientAccountant().to_record())  # type: ignore[arg-type]
    assert ClientAccountant.from_record(empty) == ClientAccountant()


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"noise": [1.0], "rate": [0.1]},
        {"noise": [1.0], "rate": [0.1], "steps": [1, 2]},
        {"noise": 1.0, "rate": [0.1], "steps": [1]},
        {"noise": [0.0], "rate": [0.1], "steps": [1]},
        {"noise": [1.0], "rate": [1.1], "steps": [1]},
        {"noise": [1.0], "rate": [0.1], "steps": [0]},
        {"noise": [1.0], "rate": [0.1], "steps": [1.5]},
        {"noise": ["1.0"], "rate": [0.1], "steps": [1]},
        {"noise": [True], "rate": [0.1], "steps": [1]},
    ],
)
def test_malformed_record_raises(record: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ClientAccountant.from_record(record)


def test_json_is_readable_and_round_trips() -> None:
    accountant = ClientAccountant(HISTORY)
    text = accountant.to_json()
    document = json.loads(text)
    assert document["accountant"] == "rdp"
    assert document["history"][0] == {
        "noise_multiplier": 1.1,
        "sample_rate": 0.015625,
        "steps": 64,
    }
    assert text == json.dumps(document, indent=2, sort_keys=True) + "\n"
    assert ClientAccountant.from_json(text) == accountant


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "accountant.json"
    accountant = ClientAccountant(HISTORY)
    accountant.save(path)
    loaded = ClientAccountant.load(path)
    assert loaded == accountant
    assert loaded.epsilon(DELTA) == accountant.epsilon(DELTA)
    accountant.record(MechanismStep(noise_multiplier=2.0, sample_rate=1.0, steps=4))
    accountant.save(path)  # overwrite in place
    assert ClientAccountant.load(path) == accountant
    assert sorted(p.name for p in path.parent.iterdir()) == ["accountant.json"]  # no temp left


def test_load_missing_file_gives_empty_accountant(tmp_path: Path) -> None:
    assert ClientAccountant.load(tmp_path / "absent.json") == ClientAccountant()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'{"version": 1, "accountant": "rdp"}',
        b'{"version": 2, "accountant": "rdp", "history": []}',
        b'{"version": 1, "accountant": "prv", "history": []}',
        b'{"version": 1, "accountant": "rdp", "history": [{"noise_multiplier": 1.0}]}',
        b'{"version": 1, "accountant": "rdp", "history": '
        b'[{"noise_multiplier": 0, "sample_rate": 0.1, "steps": 1}]}',
    ],
)
def test_load_corrupt_file_raises_naming_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "accountant.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=str(path)):
        ClientAccountant.load(path)


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    ("target", "delta", "rate", "steps"),
    [
        (1.0, 1e-5, 0.01, 1000),
        (3.0, 1e-5, 0.05, 200),
        (8.0, 1e-6, 0.004, 2500),
        (2.0, 1e-3, 1.0, 5),
    ],
)
def test_noise_multiplier_for_budget(target: float, delta: float, rate: float, steps: int) -> None:
    sigma = noise_multiplier_for_budget(
        target_epsilon=target, delta=delta, sample_rate=rate, steps=steps
    )
    step = MechanismStep(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    epsilon = ClientAccountant([step]).epsilon(delta)
    assert epsilon <= target
    assert epsilon >= 0.98 * target


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_epsilon": 0.0},
        {"target_epsilon": -1.0},
        {"target_epsilon": math.inf},
        {"delta": 0.0},
        {"sample_rate": 0.0},
        {"sample_rate": 2.0},
        {"steps": 0},
    ],
)
def test_noise_multiplier_for_budget_validates(kwargs: dict[str, float]) -> None:
    arguments: dict[str, float] = {
        "target_epsilon": 1.0,
        "delta": 1e-5,
        "sample_rate": 0.01,
        "steps": 100,
    }
    arguments.update(kwargs)
    with pytest.raises(ConfigError):
        noise_multiplier_for_budget(**arguments)  # type: ignore[arg-type]


def test_noise_multiplier_for_unreachable_budget_raises() -> None:
    with pytest.raises(ConfigError, match="cannot reach"):
        noise_multiplier_for_budget(target_epsilon=1e-12, delta=1e-5, sample_rate=1.0, steps=1)
