"""Client-level mechanisms held to slow references: the strategy matrices built by hand, the
noise's covariance against them, epsilon against dp-accounting and the exact Gaussian curve,
and an attacker who knows every other client's update and tests for one client's presence.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from pollinate.config import ClientDP, RunSettings
from pollinate.errors import ConfigError
from pollinate.privacy.client_level import (
    calibrate_noise,
    gaussian_epsilons,
    sensitivity,
    strategy_matrix,
    worst_sensitivity,
)
from pollinate.privacy.correlated_noise import NoiseStream
from pollinate.privacy.noise import NoiseSource
from pollinate.serverapp.client_dp import account, eligibility, plan_client_dp
from tests.support.audit import hand_strategy_matrix

pytestmark = pytest.mark.unit

NAMES = {"tree": "ftrl-tree", "banded": "ftrl-banded", "independent": "server-fixed"}


def _hand_prefix_nodes(t: int) -> list[tuple[int, int]]:
    """The dyadic intervals (start, stop) whose union is rounds 1..t, by a plain loop."""
    out, start = [], 0
    for level in reversed(range(t.bit_length())):
        if t - start >= 2**level:
            out.append((start, start + 2**level))
            start += 2**level
    return out


@pytest.mark.parametrize("horizon", [1, 2, 5, 8, 13])
@pytest.mark.parametrize(("correlation", "bands"), [("tree", 1), ("banded", 3), ("banded", 20)])
def test_strategy_matrices_and_sensitivities_match_hand_built_ones(
    horizon: int, correlation: str, bands: int
) -> None:
    hand = hand_strategy_matrix(NAMES[correlation], horizon, bands)
    ours = strategy_matrix(correlation, horizon, bands)  # type: ignore[arg-type]
    # the rows are the released noise vectors: the same set, in any order
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, hand.tolist()))
    rng = np.random.default_rng(horizon)
    for _ in range(20):
        rounds = sorted(set(rng.integers(1, horizon + 1, size=rng.integers(1, horizon + 1))))
        u = np.zeros(horizon)
        u[[r - 1 for r in rounds]] = 1
        expected = float(np.linalg.norm(hand @ u))
        got = sensitivity(correlation, rounds, horizon=horizon, bands=bands)  # type: ignore[arg-type]
        assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("horizon", [3, 6, 8, 11])
def test_worst_sensitivity_is_the_maximum_over_every_pattern(horizon: int) -> None:
    hand = hand_strategy_matrix("ftrl-tree", horizon, 1)
    for k in range(1, horizon + 1):
        brute = max(
            float(np.linalg.norm(hand[:, list(cols)].sum(axis=1)))
            for cols in itertools.combinations(range(horizon), k)
        )
        assert worst_sensitivity("tree", horizon=horizon, participations=k) == pytest.approx(brute)
    # banded, rounds at least `bands` apart: every such pattern, brute force
    bands = 3
    banded = hand_strategy_matrix("ftrl-banded", horizon, bands)
    spaced = [
        cols
        for k in range(1, horizon + 1)
        for cols in itertools.combinations(range(horizon), k)
        if all(b - a >= bands for a, b in itertools.pairwise(cols))
    ]
    brute = max(float(np.linalg.norm(banded[:, list(c)].sum(axis=1))) for c in spaced)
    got = worst_sensitivity("banded", horizon=horizon, participations=horizon, bands=bands)
    assert got == pytest.approx(brute)


def _stream_draws(correlation: str, horizon: int, bands: int, width: int) -> np.ndarray:
    stream = NoiseStream(correlation, bands=bands)  # type: ignore[arg-type]
    source = NoiseSource.for_tests(7)
    return np.stack([stream.next(t, [(width,)], 1.0, source)[0] for t in range(1, horizon + 1)])


@pytest.mark.parametrize(("correlation", "bands"), [("tree", 1), ("banded", 4), ("independent", 1)])
def test_the_noise_has_the_covariance_of_the_hand_built_mechanism(
    correlation: str, bands: int
) -> None:
    """Every column is an independent run; the running sums of the per-round noise must have
    covariance B B^T with B the decoder of C (prefix sums of the noise the model sees)."""
    horizon, width = 8, 40_000
    prefix = np.cumsum(_stream_draws(correlation, horizon, bands, width), axis=0)
    empirical = prefix @ prefix.T / width
    if correlation == "tree":
        # prefix t is the sum of its dyadic nodes: shared nodes make the covariance
        nodes = [set(_hand_prefix_nodes(t)) for t in range(1, horizon + 1)]
        expected = np.array([[len(a & b) for b in nodes] for a in nodes], dtype=float)
    else:
        c = hand_strategy_matrix(NAMES[correlation], horizon, bands)
        decoder = np.tril(np.ones((horizon, horizon))) @ np.linalg.inv(c)
        expected = decoder @ decoder.T
    np.testing.assert_allclose(empirical, expected, atol=0.04 * expected.max())


def test_the_stream_resumes_from_its_state_and_skipped_rounds_keep_their_place() -> None:
    for correlation, bands in (("tree", 1), ("banded", 3)):
        whole = NoiseStream(correlation, bands=bands)  # type: ignore[arg-type]
        src = NoiseSource.for_tests(3)
        out = [whole.next(t, [(5,)], 1.0, src)[0] for t in range(1, 4)]
        half = NoiseStream(correlation, bands=bands)  # type: ignore[arg-type]
        half.next(1, [(5,)], 1.0, src)
        resumed = NoiseStream(correlation, bands=bands)  # type: ignore[arg-type]
        resumed.load_state(half.state())
        np.testing.assert_array_equal(resumed.next(2, [(5,)], 1.0, src)[0], out[1])
        # round 2 released nothing: round 3's noise is the same as when it did
        skipping = NoiseStream(correlation, bands=bands)  # type: ignore[arg-type]
        skipping.next(1, [(5,)], 1.0, src)
        np.testing.assert_array_equal(skipping.next(3, [(5,)], 1.0, src)[0], out[2])
        with pytest.raises(ConfigError, match="stream"):
            skipping.next(3, [(5,)], 1.0, src)


@pytest.mark.parametrize("noise", [0.6, 1.0, 2.5, 8.0])
def test_epsilon_matches_dp_accounting_and_bounds_the_exact_gaussian_curve(noise: float) -> None:
    import dp_accounting
    from dp_accounting import pld, rdp

    delta = 1e-6
    ours = gaussian_epsilons(noise, delta)
    event = dp_accounting.GaussianDpEvent(noise)
    assert ours.rdp == pytest.approx(rdp.RdpAccountant().compose(event).get_epsilon(delta))
    fine = pld.PLDAccountant(value_discretization_interval=1e-5).compose(event)
    assert ours.pld == pytest.approx(fine.get_epsilon(delta), rel=1e-3)
    assert ours.epsilon == min(ours.rdp, ours.pld)

    # Balle & Wang (2018), written out here: the exact delta of the Gaussian mechanism at
    # epsilon. The reported epsilon is at least the exact one (the exact delta there is at most
    # the target) and no looser than 1e-6 relative (a hair below it, the delta is exceeded).
    def exact_delta(eps: float) -> float:
        mu = 1 / noise
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    assert exact_delta(ours.pld) <= delta * (1 + 1e-9)
    assert exact_delta(ours.pld * (1 - 1e-6)) > delta


def test_calibration_meets_the_target_for_the_worst_placed_client() -> None:
    for target in (1.0, 2.0, 8.0):
        worst = worst_sensitivity("tree", horizon=20, participations=3)
        z = calibrate_noise(target, delta=1e-6, worst=worst)
        spent = gaussian_epsilons(z / worst, 1e-6).epsilon
        assert target * 0.99 < spent <= target
    with pytest.raises(ConfigError, match="cannot be reached"):
        calibrate_noise(1e-9, delta=1e-12, worst=1.0)


def test_an_attacker_who_knows_everyone_else_learns_no_more_than_accounted() -> None:
    """The server sees every round's noised sum and knows every other client's update; it
    tests whether one client took part (a +clip update in its rounds) with the optimal
    (Neyman-Pearson) linear statistic for the noise's true covariance. The separation of the
    statistic between 'in' and 'out', estimated over many runs, must not exceed the
    accounted ``||C u|| / z``, and for a matrix mechanism it reaches it."""
    horizon, width, z = 8, 60_000, 1.5
    for correlation, bands, rounds in (
        ("independent", 1, [2, 5, 7]),
        ("banded", 3, [1, 4, 7]),
        ("tree", 1, [3, 4]),
    ):
        draws = _stream_draws(correlation, horizon, bands, width) * z  # clip = 1
        u = np.zeros(horizon)
        u[[r - 1 for r in rounds]] = 1.0
        cov = np.cov(draws)
        w = np.linalg.solve(cov, u)
        out_stat = w @ draws
        in_stat = w @ (draws + u[:, None])
        separation = (in_stat.mean() - out_stat.mean()) / out_stat.std()
        accounted = sensitivity(correlation, rounds, horizon=horizon, bands=bands) / z  # type: ignore[arg-type]
        assert separation <= accounted * 1.03, correlation
        if correlation != "tree":  # the tree's decoder discards what its extra nodes hold
            assert separation == pytest.approx(accounted, rel=0.03)


def test_plan_participation_limits_and_eligibility() -> None:
    settings = RunSettings(
        client_dp=ClientDP.FTRL_BANDED, num_server_rounds=10, fraction_train=0.25,
        client_dp_target_epsilon=2.0, dp="none",  # type: ignore[arg-type]
    )  # fmt: skip
    plan = plan_client_dp(settings, population=20)
    assert plan is not None
    assert (plan.cohort, plan.bands, plan.separation, plan.participations) == (5, 4, 4, 3)
    allowed = eligibility(plan, {"a": [1], "b": [2, 6]}, 5, noise=1.0, delta=1e-5, budget=0)
    assert allowed is not None
    assert [allowed(c) for c in ("a", "b", "new")] == [True, False, True]
    worst, eps = account(plan, {"a": [1, 5, 9]}, noise=plan.noise_multiplier, delta=1e-5)
    assert worst == pytest.approx(plan.worst_sensitivity)
    assert eps.epsilon <= 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client-dp-quantile": 1.0}, "client-dp-quantile"),
        ({"client-dp-quantile": 0}, "client-dp-quantile"),
        ({"robust": "krum"}, "choose one of the two"),
        ({"secure-aggregation": True, "client-dp": "ftrl-tree"}, "cannot clip"),
        ({"client-dp-bands": -1}, "client-dp-bands"),
    ],
)
def test_bad_client_dp_settings_are_one_clear_error(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config({"dp": "none", "client-dp": "server-adaptive", **overrides})


def test_adaptive_noise_too_small_a_count_noise_is_refused() -> None:
    settings = RunSettings.from_run_config(
        {"dp": "none", "client-dp": "server-adaptive", "client-dp-noise": 3.0}
    )
    with pytest.raises(ConfigError, match="client-dp-count-noise"):
        plan_client_dp(settings, population=100)  # cohort 10: count noise 0.5 < 3 / 2


def test_poisson_sampling_accounting_is_amplified_and_checked_by_opacus() -> None:
    """Secret Poisson coins earn amplification: every client is charged every round with the
    subsampled Gaussian; Opacus' own RDP analysis (another implementation) agrees."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    from pollinate.privacy.client_level import amplified_epsilons

    ours = amplified_epsilons(1.2, 0.1, 20, 1e-6)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    curve = opacus_rdp.compute_rdp(q=0.1, noise_multiplier=1.2, steps=20, orders=orders)
    theirs, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=curve, delta=1e-6)
    assert ours.rdp == pytest.approx(theirs, rel=0.05)
    assert ours.pld < ours.rdp and ours.epsilon == ours.pld
    # far below the same noise without amplification, charged 20 times
    assert ours.epsilon < gaussian_epsilons(1.2 / math.sqrt(20), 1e-6).epsilon / 3
    z = calibrate_noise(2.0, delta=1e-6, worst=1.0, sample_rate=0.1, rounds=20)
    assert 2.0 * 0.99 < amplified_epsilons(z, 0.1, 20, 1e-6).epsilon <= 2.0


def test_the_poisson_coins_are_not_fixed_by_the_seed() -> None:
    """An attacker with the run seed cannot tell who was drawn: two draws with the same seed
    differ (unless the test-only reproducible switch is on)."""
    from types import SimpleNamespace

    from pollinate.serverapp.rounds import _secret_coins

    def coins(reproducible: bool) -> np.ndarray:
        run = SimpleNamespace(settings=RunSettings(seed=5, reproducible_noise=reproducible))
        return _secret_coins(run, 3).random(1000)  # type: ignore[arg-type]

    assert not np.array_equal(coins(False), coins(False))
    assert np.array_equal(coins(True), coins(True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client-dp": "ftrl-banded"}, "DP-FTRL is accounted without sampling"),
        ({"client-dp": "server-fixed", "participation-bound": 2}, "participation-bound = 0"),
    ],
)
def test_poisson_sampling_refuses_what_it_cannot_account(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config({"dp": "none", "client-sampling": "poisson", **overrides})


def test_a_real_federation_refuses_poisson_sampling(tmp_path: Path) -> None:
    """Its ServerApp draws the coins itself: no amplification may be claimed there."""
    from pollinate.ops.runs import start_run

    config = {"dp": "none", "client-dp": "server-fixed", "client-sampling": "poisson"}
    with pytest.raises(ConfigError, match="coins the server never sees"):
        start_run(tmp_path, tmp_path, config)
    assert not (tmp_path / "runs.json").exists()
