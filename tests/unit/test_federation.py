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
from pollinate.serverapp.federation import run_federation
from pollinate.serverapp.strategy import client_noise, dp_wrapper
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
    expected = client_noise(settings, population=POPULATION)
    assert expected != pytest.approx(DEFAULT_CLIENT_NOISE)

    result = run_federation(LocalGrid(POPULATION), settings)

    assert [r.server_round for r in result.history] == [0, 1, 2]
    privacy = _privacy(result.run_dir)
    releases = privacy["ledger"]["client_level_releases"]
    assert [r["server_round"] for r in releases] == [1, 2]
    for release in releases:
        assert release["noise_multiplier"] == expected
        assert release["noise_multiplier"] != DEFAULT_CLIENT_NOISE
    assert privacy["summary"]["client_level"]["noise_multiplier"] == expected
    assert result.privacy["client_level"]["epsilon"] == pytest.approx(8.0, rel=1e-6)
    run_json = json.loads((result.run_dir / "run.json").read_text())
    assert run_json["client_noise"] == expected


def test_the_ledger_records_the_noise_the_dp_wrapper_adds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a recomputation from the settings: whatever the wrapper holds is what it adds."""
    build = run_setup.build_strategy

    def build_with_other_noise(settings: RunSettings, *, population: int) -> Strategy:
        strategy = build(settings, population=population)
        dp_wrapper(strategy).noise_multiplier = 1.7
        return strategy

    monkeypatch.setattr(run_setup, "build_strategy", build_with_other_noise)
    result = run_federation(LocalGrid(POPULATION), _settings(tmp_path / "run"))

    releases = _privacy(result.run_dir)["ledger"]["client_level_releases"]
    assert [r["noise_multiplier"] for r in releases] == [1.7, 1.7]
    assert json.loads((result.run_dir / "run.json").read_text())["client_noise"] == 1.7


def test_a_client_level_dp_run_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_federation(LocalGrid(POPULATION), _settings(run_dir, **{"num-server-rounds": 1}))
    assert [r.server_round for r in first.history] == [0, 1]

    # The checkpoint stores arrays sorted by name; client-level clipping zips the replies'
    # arrays (in the model's order) against the global model's, so the order must survive.
    resumed = run_federation(LocalGrid(POPULATION), _settings(run_dir, resume=True))
    assert [r.server_round for r in resumed.history] == [0, 1, 2]
    assert list(resumed.model) == list(first.model)
    releases = _privacy(run_dir)["ledger"]["client_level_releases"]
    assert [r["server_round"] for r in releases] == [1, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["server_round"] for m in metrics] == [0, 1, 2]
