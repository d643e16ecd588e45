"""Smoke test of the reference Flower app (benchmarks/reference_flower_app) and its
measurement (tests/support/reference.py)."""

from __future__ import annotations

import math
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.reference import APP_DIR, reference_flower

pytestmark = pytest.mark.slow


def test_reference_app_defaults_match_its_pyproject() -> None:
    # run.py's simulations get no run config: the apps fall back to DEFAULT_CONFIG.
    sys.path.insert(0, str(APP_DIR))
    try:
        from refapp.task import DEFAULT_CONFIG
    finally:
        sys.path.remove(str(APP_DIR))
    flwr = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]
    assert flwr["app"]["config"] == DEFAULT_CONFIG
    assert flwr["app"]["components"] == {
        "serverapp": "refapp.server_app:app",
        "clientapp": "refapp.client_app:app",
    }
    # flwr 1.42 rewrites pyproject.toml to migrate a [tool.flwr.federations] table.
    assert "federations" not in flwr


def test_reference_app_runs_two_rounds_and_reports_timings(tmp_path: Path) -> None:
    result = reference_flower(num_supernodes=10, rounds=2, workdir=tmp_path, timeout=300)
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
    times = [r["t_s"] for r in result["rounds"]]
    assert times == sorted(times)
    assert 0 < result["time_to_first_round_s"] <= result["wall_s"]
    assert result["warm_s_per_round"] > 0
    assert math.isfinite(result["final_accuracy"])
    assert 0.0 <= result["final_accuracy"] <= 1.0
    assert result["peak_rss_mb"] > 0
