"""Whole runs of the ServerApp's round loop on the fast in-process grid.

Client-level DP: the ledger records the noise multiplier the DP wrapper adds (calibrated
once to ``client-dp-target-epsilon``, not recomputed every round), and a resumed run keeps
the global model in the order the clients reply in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.serverapp.strategy import Strategy

import pollinate.serverapp.setup as run_setup
from pollinate.config import RunSettings
from pollinate.privacy.client_level import gaussian_epsilons
from pollinate.serverapp.client_dp import plan_client_dp
from pollinate.serverapp.federation import run_federation
from pollinate.serverapp.strategy import dp_wrapper
from pollinate.simulation.local_grid import LocalGrid

pytestmark = pytest.mark.unit

POPULATION = 10
DEFAULT_CLIENT_NOISE = 1.0  # RunSettings.client_dp_noise


def _settings(run_dir: Path, **overrides: object) -> RunSettings:
    return RunSettings.from_run_config(
        {
            "run-dir": str(run_dir),
            "dataset": "digits",
            "dp": "none",
            "client-dp": "server-fixed",
            "client-dp-target-epsilon": 8.0,
            "num-server-rounds": 2,
            "min-available-nodes": POPULATION,
            **overrides,
        }
    )


def _privacy(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "privacy.json").read_text())
    return data


def test_client_level_noise_recorded_is_the_calibrated_one(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "run")
    plan = plan_client_dp(settings, population=POPULATION)
    assert plan is not None
    expected = plan.noise_multiplier
    assert expected != pytest.approx(DEFAULT_CLIENT_NOISE)
    # calibrated for the worst-placed client: one in both rounds, within 0.1 % of the target
    worst = gaussian_epsilons(expected / plan.worst_sensitivity, settings.target_delta)
    assert 8.0 * 0.99 < worst.epsilon <= 8.0

    result = run_federation(LocalGrid(POPULATION), settings)

    assert [r.server_round for r in result.history] == [0, 1, 2]
    privacy = _privacy(result.run_dir)
    releases = privacy["ledger"]["client_level_releases"]
    assert [r["server_round"] for r in releases] == [1, 2]
    for release in releases:
        assert release["noise_multiplier"] == expected
        assert release["noise_multiplier"] != DEFAULT_CLIENT_NOISE
    assert privacy["summary"]["client_level"]["noise_multiplier"] == expected
    assert 0 < result.privacy["client_level"]["epsilon"] <= 8.0
    run_json = json.loads((result.run_dir / "run.json").read_text())
    assert run_json["client_noise"] == expected


def test_the_ledger_records_the_noise_the_dp_wrapper_adds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a recomputation from the settings: whatever the wrapper holds is what it adds."""
    build = run_setup.build_strategy

    def build_with_other_noise(settings: RunSettings, *, population: int) -> Strategy:
        strategy = build(settings, population=population)
        wrapper = dp_wrapper(strategy)
        assert wrapper is not None
        wrapper.noise_multiplier = 1.7
        return strategy

    monkeypatch.setattr(run_setup, "build_strategy", build_with_other_noise)
    result = run_federation(LocalGrid(POPULATION), _settings(tmp_path / "run"))

    releases = _privacy(result.run_dir)["ledger"]["client_level_releases"]
    assert [r["noise_multiplier"] for r in releases] == [1.7, 1.7]
    assert json.loads((result.run_dir / "run.json").read_text())["client_noise"] == 1.7


def test_a_client_level_dp_run_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    given = {"client-dp-target-epsilon": 0.0, "client-dp-noise": 2.0}  # more rounds allowed
    first = run_federation(
        LocalGrid(POPULATION), _settings(run_dir, **{"num-server-rounds": 1}, **given)
    )
    assert [r.server_round for r in first.history] == [0, 1]

    # The checkpoint stores arrays sorted by name; client-level clipping zips the replies'
    # arrays (in the model's order) against the global model's, so the order must survive.
    resumed = run_federation(LocalGrid(POPULATION), _settings(run_dir, resume=True, **given))
    assert [r.server_round for r in resumed.history] == [0, 1, 2]
    assert list(resumed.model) == list(first.model)
    releases = _privacy(run_dir)["ledger"]["client_level_releases"]
    assert [r["server_round"] for r in releases] == [1, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["server_round"] for m in metrics] == [0, 1, 2]


@pytest.mark.parametrize("mechanism", ["server-adaptive", "ftrl-tree", "ftrl-banded"])
def test_every_mechanism_is_accounted_per_client_and_recomputes_independently(
    tmp_path: Path, mechanism: str
) -> None:
    """Each release names the clients it summed; each client's rounds respect the plan's
    limits; dp-accounting on the hand-built strategy matrix gives back every epsilon; and a
    resumed run carries the noise stream on."""
    from tests.support.audit import check_run

    run_dir = tmp_path / "run"
    overrides = {
        "client-dp": mechanism, "client-dp-target-epsilon": 0.0, "target-epsilon": 4.0,
        "fraction-train": 0.3, "client-dp-count-noise": 5.0, "num-server-rounds": 2,
    }  # fmt: skip
    run_federation(LocalGrid(POPULATION), _settings(run_dir, **overrides))
    overrides["num-server-rounds"] = 4
    with pytest.raises(Exception, match="num-server-rounds"):  # the horizon is fixed
        run_federation(LocalGrid(POPULATION), _settings(run_dir, resume=True, **overrides))
    overrides["num-server-rounds"] = 2
    privacy = _privacy(run_dir)
    releases = privacy["ledger"]["client_level_releases"]
    assert [len(r["clients"]) for r in releases] == [3, 3]
    assert {r["mechanism"] for r in releases} == {mechanism}
    if mechanism == "ftrl-banded":
        rounds: dict[str, list[int]] = {}
        for r in releases:
            for c in r["clients"]:
                rounds.setdefault(c, []).append(r["server_round"])
        assert releases[0]["bands"] == 2  # min(rounds, population // cohort)
        assert all(len(v) == 1 for v in rounds.values())  # 2 rounds apart: once in 2 rounds
    summary, records = check_run(run_dir, "client")
    assert summary["under_reports_vs_pld"] == 0
    assert summary["max_rel_diff_pld"] < 1e-3
    assert all(0 < r.reported <= 4.0 for r in records)


def test_poisson_cohorts_are_accounted_amplified_and_never_written_down(tmp_path: Path) -> None:
    from tests.support.audit import check_run

    run_dir = tmp_path / "run"
    overrides = {
        "client-sampling": "poisson", "fraction-train": 0.3, "num-server-rounds": 3,
        "client-dp-target-epsilon": 3.0,
    }  # fmt: skip
    result = run_federation(LocalGrid(POPULATION), _settings(run_dir, **overrides))
    releases = _privacy(run_dir)["ledger"]["client_level_releases"]
    assert [r["server_round"] for r in releases] == [1, 2, 3]
    assert all(r["clients"] == [] and r["sample_rate"] == 0.3 for r in releases)
    summary, _ = check_run(run_dir, "client")
    assert summary["under_reports_vs_pld"] == 0 and summary["max_rel_diff_pld"] < 1e-3
    assert 3.0 * 0.99 < result.privacy["client_level"]["epsilon"] <= 3.0


def test_dp_sgd_samples_only_clients_within_the_participation_bound(tmp_path: Path) -> None:
    """The noise was calibrated for `participation-bound` rounds: clients past it are not
    sampled (they would decline and waste the slot); the run ends when none is left."""
    settings = RunSettings.from_run_config(
        {
            "run-dir": str(tmp_path / "run"), "dataset": "digits", "dp": "sample",
            "target-epsilon": 4.0, "participation-bound": 1, "num-server-rounds": 3,
            "fraction-train": 0.5, "min-available-nodes": POPULATION,
        }
    )  # fmt: skip
    result = run_federation(LocalGrid(POPULATION), settings)
    assert [r.server_round for r in result.history] == [0, 1, 2]  # 10 clients, 5 a round
    assert sum(r.declined for r in result.history) == 0
    entries = _privacy(result.run_dir)["ledger"]["clients"]
    clients = [e["client"] for e in entries]
    assert len(clients) == len(set(clients)) == POPULATION


def test_a_run_directory_from_before_the_ledger_database_resumes_into_one(
    tmp_path: Path,
) -> None:
    """Older run directories kept the whole ledger in each checkpoint's state.json: a resume
    moves it into ledger.sqlite and goes on appending there."""
    run_dir = tmp_path / "run"
    given = {"client-dp-target-epsilon": 0.0, "client-dp-noise": 2.0}
    run_federation(LocalGrid(POPULATION), _settings(run_dir, **{"num-server-rounds": 1}, **given))
    state_file = run_dir / "checkpoints" / "round-0001" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("ledger_file") == "ledger.sqlite" and "ledger" not in state
    state["ledger"] = _privacy(run_dir)["ledger"]  # the old layout
    state_file.write_text(json.dumps(state))
    (run_dir / "ledger.sqlite").unlink()

    run_federation(LocalGrid(POPULATION), _settings(run_dir, resume=True, **given))
    from pollinate.privacy import PrivacyLedger
    from pollinate.privacy.ledger_store import LedgerStore

    ledger = PrivacyLedger.from_store(LedgerStore(run_dir / "ledger.sqlite"))
    assert [r.server_round for r in ledger.releases] == [1, 2]
    assert json.loads(json.dumps(ledger.to_dict())) == _privacy(run_dir)["ledger"]
