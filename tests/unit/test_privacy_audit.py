"""Tests of tests/support/audit.py: the one-run audit bound and the ledger recomputation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from tests.support.audit import (
    LedgerFormatError,
    epsilon_lower_bound,
    read_ledger,
    recompute_client_level,
    recompute_sample_level,
    rel_diff,
    summarize,
)

pytestmark = pytest.mark.unit

DELTA = 1e-5

# ---------------------------------------------------------------- the bound


def _exact_tail(correct: int, guesses: int, p: float) -> float:
    """P[Binomial(guesses, p) >= correct], summed term by term (no scipy)."""
    return math.fsum(
        math.comb(guesses, k) * p**k * (1 - p) ** (guesses - k) for k in range(correct, guesses + 1)
    )


def _brute_force_bound(correct: int, guesses: int, alpha: float, step: float) -> float:
    """The largest eps on a grid of ``step`` whose tail is <= alpha (0 when none is)."""
    best = 0.0
    for i in range(int(12 / step) + 1):
        eps = i * step
        p = math.exp(eps) / (1 + math.exp(eps))
        if _exact_tail(correct, guesses, p) <= alpha:
            best = eps
        else:
            break  # the tail grows with eps
    return best


@pytest.mark.parametrize(
    ("correct", "guesses"),
    [(5, 5), (10, 10), (15, 20), (30, 50), (35, 50), (40, 50), (20, 40), (1, 1), (58, 100)],
)
def test_bound_matches_a_brute_force_search(correct: int, guesses: int) -> None:
    step = 1e-3
    reference = _brute_force_bound(correct, guesses, 0.05, step)
    bound = epsilon_lower_bound(correct, guesses, 0.95)
    if reference == 0.0 and _exact_tail(correct, guesses, 0.5) > 0.05:
        assert bound == 0.0
    else:
        assert reference <= bound <= reference + step


def test_bound_of_all_correct_is_the_closed_form() -> None:
    """All r guesses right: p^r = alpha, so eps = logit(alpha^(1/r))."""
    for guesses in (5, 20, 100):
        p = 0.05 ** (1 / guesses)
        assert epsilon_lower_bound(guesses, guesses) == pytest.approx(
            math.log(p / (1 - p)), rel=1e-9
        )


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses() -> None:
    assert epsilon_lower_bound(0, 0) == 0.0
    assert epsilon_lower_bound(50, 100) == 0.0
    bounds = [epsilon_lower_bound(c, 100) for c in range(50, 101)]
    assert bounds == sorted(bounds)
    assert bounds[-1] > 3.0
    # a stricter confidence gives a smaller bound
    assert epsilon_lower_bound(80, 100, 0.99) < epsilon_lower_bound(80, 100, 0.95)


def test_bound_rarely_exceeds_the_true_epsilon() -> None:
    """Guesses right with probability e^eps/(1+e^eps) (randomised response, exactly eps-DP):
    the 95% lower bound may exceed eps in at most about 5% of trials."""
    eps, guesses, trials = 1.0, 60, 300
    rng = np.random.default_rng(0)
    correct = rng.binomial(guesses, math.exp(eps) / (1 + math.exp(eps)), size=trials)
    above = sum(epsilon_lower_bound(int(c), guesses) > eps for c in correct)
    assert above / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


@pytest.mark.parametrize(("correct", "guesses"), [(-1, 5), (6, 5)])
def test_bound_rejects_impossible_counts(correct: int, guesses: int) -> None:
    with pytest.raises(ValueError, match="correct"):
        epsilon_lower_bound(correct, guesses)


# ---------------------------------------------------------------- recomputation

# Two clients: a trains in rounds 1 and 3 (different noise and rate), b in round 2 only.
ROUNDS: dict[str, list[tuple[int, float, float, int]]] = {
    "a": [(1, 1.1, 0.1, 20), (3, 0.9, 0.2, 10)],
    "b": [(2, 1.3, 0.05, 40)],
}


def _opacus_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(DELTA))


def _ledger(**overrides: Any) -> dict[str, Any]:
    clients = []
    for client, rounds in ROUNDS.items():
        history: list[tuple[float, float, int]] = []
        for rnd, noise, rate, steps in rounds:
            history.append((noise, rate, steps))
            clients.append(
                {
                    "server_round": rnd,
                    "client": client,
                    "epsilon": _opacus_epsilon(history),
                    "delta": DELTA,
                    "noise_multiplier": noise,
                    "sample_rate": rate,
                    "steps": steps,
                    "release": "train",
                }
            )
    ledger: dict[str, Any] = {
        "version": 1,
        "delta": DELTA,
        "sample_level": True,
        "client_level": True,
        "clients": sorted(clients, key=lambda e: e["server_round"]),
        "declines": [],
        "client_level_releases": [
            {"server_round": r, "epsilon": 0.0, "delta": DELTA, "noise_multiplier": n}
            for r, n in ((1, 2.0), (2, 2.0), (3, 1.5))
        ],
    }
    ledger.update(overrides)
    return ledger


def test_sample_level_recompute_matches_opacus_composition() -> None:
    records = recompute_sample_level(_ledger())
    assert len(records) == 3
    by_key = {(r.key, r.server_round): r for r in records}
    for client, rounds in ROUNDS.items():
        history = []
        for rnd, noise, rate, steps in rounds:
            history.append((noise, rate, steps))
            expected = _opacus_epsilon(history)
            got = by_key[(client, rnd)]
            assert got.reported == expected
            # dp-accounting's fractional orders run slightly high (sign-less series): 1e-3
            assert got.rdp_opacus_orders == pytest.approx(expected, rel=1e-3)
            assert got.rdp_default_orders <= got.rdp_opacus_orders * (1 + 1e-9)
            assert got.pld < got.rdp_opacus_orders  # PLD is tighter than RDP
    # the check can fail: round 3 alone (not composed with round 1) is far from the ledger's
    alone = _opacus_epsilon([(0.9, 0.2, 10)])
    assert rel_diff(alone, by_key[("a", 3)].reported) > 0.05


def test_summary_flags_an_under_report() -> None:
    ledger = _ledger()
    ledger["clients"][0] = {
        **ledger["clients"][0],
        "epsilon": 0.5 * ledger["clients"][0]["epsilon"],
    }
    summary = summarize(recompute_sample_level(ledger))
    assert summary["epsilons_checked"] == 3
    assert summary["under_reports_vs_pld"] == 1
    assert summary["max_rel_diff_rdp_opacus_orders"] > 0.9
    assert summarize(recompute_sample_level(_ledger()))["under_reports_vs_pld"] == 0


def test_client_level_recompute_is_gaussian_composition() -> None:
    records = recompute_client_level(_ledger())
    assert [r.server_round for r in records] == [1, 2, 3]
    # Opacus with sample rate 1 is the plain Gaussian: RDP alpha / (2 sigma^2) per release
    history: list[tuple[float, float, int]] = []
    for record, noise in zip(records, (2.0, 2.0, 1.5), strict=True):
        history.append((noise, 1.0, 1))
        assert record.rdp_opacus_orders == pytest.approx(_opacus_epsilon(history), rel=1e-9)
        assert record.pld < record.rdp_default_orders


def test_unknown_keys_are_ignored_and_missing_keys_named(tmp_path: Path) -> None:
    ledger = _ledger()
    ledger["clients"][1] = {**ledger["clients"][1], "noise": "secure"}  # a field added later
    assert len(recompute_sample_level(ledger)) == 3
    del ledger["clients"][1]["sample_rate"]
    with pytest.raises(LedgerFormatError, match=r"clients'\]\[1\].*'sample_rate'"):
        recompute_sample_level(ledger)
    with pytest.raises(LedgerFormatError, match="'client_level_releases'"):
        recompute_client_level({"delta": DELTA})
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps({"summary": {}}))
    with pytest.raises(LedgerFormatError, match="'ledger'"):
        read_ledger(path)


def test_a_full_batch_history_is_held_to_the_exact_epsilon_not_rdp() -> None:
    """Rounds at sample rate 1 are reported by the exact Gaussian accountant: the audit holds
    them to dp-accounting's PLD, and an RDP value in their place shows as a 5 % difference."""
    from pollinate.privacy import ClientAccountant, MechanismStep

    rounds = [(1, 1.4, 1), (2, 1.4, 1), (4, 0.9, 2)]
    accountant, entries, rdp_entries = ClientAccountant(), [], []
    for rnd, noise, steps in rounds:
        accountant.record(MechanismStep(noise, 1.0, steps))
        rdp, _ = accountant.epsilons(DELTA)
        entry = {"server_round": rnd, "client": "c", "delta": DELTA, "noise_multiplier": noise,
                 "sample_rate": 1.0, "steps": steps, "release": "train"}  # fmt: skip
        entries.append({**entry, "epsilon": accountant.epsilon(DELTA)})
        rdp_entries.append({**entry, "epsilon": rdp})
    exact = summarize(recompute_sample_level(_ledger(clients=entries)))
    assert all(r.full_batch for r in recompute_sample_level(_ledger(clients=entries)))
    assert exact["max_rel_diff_own_accountant"] < 1e-3
    assert exact["under_reports_vs_pld"] == 0
    looser = summarize(recompute_sample_level(_ledger(clients=rdp_entries)))
    assert looser["max_rel_diff_own_accountant"] > 0.05
