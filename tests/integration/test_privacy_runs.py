"""Budgets, declines and client-level DP in real simulations."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest

from pollinate.privacy import ClientAccountant, MechanismStep
from tests.support.simulation import simulate

pytestmark = pytest.mark.slow


def test_clients_decline_past_their_budget_and_the_server_counts_it(tmp_path: Path) -> None:
    # 20 clients hold 200 training samples each: batch 32 -> 7 Poisson batches (q = 1/7).
    one = ClientAccountant([MechanismStep(noise_multiplier=1.0, sample_rate=1 / 7, steps=7)])
    two = ClientAccountant([MechanismStep(noise_multiplier=1.0, sample_rate=1 / 7, steps=14)])
    budget = (one.epsilon(1e-5) + two.epsilon(1e-5)) / 2  # room for exactly one round
    run_dir = tmp_path / "run"
    proc = simulate(
        tmp_path, "--preset", "quick", "--num-clients", "20", "--fraction", "0.5",
        "--rounds", "4", "--epsilon-budget", f"{budget:.6f}", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    declined = sum(m["declined"] for m in metrics)
    assert declined > 0
    for m in metrics[1:]:
        assert m["replied"] == m["sampled"] == 10
    ledger = json.loads((run_dir / "privacy.json").read_text())
    sample = ledger["summary"]["sample_level"]
    assert sample["declines"] == declined
    assert sample["max_epsilon"] <= budget
    assert sample["max_epsilon"] == pytest.approx(one.epsilon(1e-5), rel=1e-9)
    assert "declin" in (run_dir / "summary.md").read_text().lower()


def test_client_level_and_sample_level_epsilon_are_reported_apart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = simulate(
        tmp_path, "--preset", "quick", "--num-clients", "20", "--fraction", "0.5",
        "--rounds", "2", "--client-dp", "server-fixed", "--set", "client-dp-noise=2.0",
        "--run-dir", str(run_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "privacy.json").read_text())["summary"]
    client = summary["client_level"]
    sample = summary["sample_level"]
    assert client["enabled"] and sample["enabled"]
    # Client level: the worst client's releases (those naming it) of the Gaussian mechanism,
    # sigma 2, no amplification, checked against Google's dp-accounting directly; the
    # tighter of RDP and PLD is reported.
    releases = json.loads((run_dir / "privacy.json").read_text())["ledger"]["client_level_releases"]
    counts: dict[str, int] = {}
    for release in releases:
        for key in release["clients"]:
            counts[key] = counts.get(key, 0) + 1
    worst = max(counts.values())
    by_rdp = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(2.0), worst)
    by_pld = dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(2.0), worst)
    assert client["epsilon_rdp"] == pytest.approx(by_rdp.get_epsilon(1e-5), rel=0.01)
    assert client["epsilon_pld"] == pytest.approx(by_pld.get_epsilon(1e-5), rel=0.01)
    assert client["epsilon"] == min(client["epsilon_rdp"], client["epsilon_pld"])
    assert client["releases"] == 2
    # Separate numbers; the summary and the report never add them.
    total = client["epsilon"] + sample["max_epsilon"]
    text = (run_dir / "summary.md").read_text()
    assert f"{total:.2f}" not in text
    assert "not added" in text or "never added" in text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics[-1]["client_level_epsilon"] == pytest.approx(client["epsilon"])
    assert metrics[-1]["max_epsilon"] == pytest.approx(sample["max_epsilon"])
