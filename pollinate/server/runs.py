"""``pollinate server run|status|stop``: training runs on a federation started with
``pollinate server start``, through the flwr CLI (``flwr run / ls / stop --format json``).

The ServerApp writes its run directory on the server (checkpoints, metrics.json,
privacy.json); ``STATE_DIR/runs.json`` remembers which run id writes where, so ``status`` can
report the rounds next to Flower's own run status.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError
from pollinate.server.superlink import SuperLinkError, _flwr

__all__ = ["default_app_dir", "run_status", "start_run", "stop_run", "toml_run_config"]

RUNS_FILE = "runs.json"


def default_app_dir() -> Path:
    """The project folder holding pollinate's Flower App (the repository root in a checkout)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root
    raise ConfigError(
        "cannot find pollinate's Flower App (pyproject.toml with [tool.flwr.app]); pass "
        "--app PATH to a checkout of pollinate"
    )


def toml_run_config(values: dict[str, Any]) -> str:
    """``{"num-server-rounds": 3, "run-dir": "/x"}`` -> ``num-server-rounds=3 run-dir="/x"``."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _runs(state_dir: Path) -> dict[str, dict[str, Any]]:
    path = Path(state_dir) / RUNS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def start_run(state_dir: Path, app_dir: Path, config: dict[str, Any]) -> tuple[str, Path]:
    """Submit a run; returns its run id and run directory (``run-dir`` defaults under STATE)."""
    from pollinate.config import RunSettings

    config = dict(config)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(config.get("run-dir") or Path(state_dir) / "runs" / stamp).resolve()
    config["run-dir"] = str(run_dir)
    RunSettings.from_run_config(config)  # one clear ConfigError before anything is sent
    answer = _flwr(
        state_dir, "run", str(app_dir), options=("--run-config", toml_run_config(config))
    )
    run_id = str(answer["run-id"])
    runs = _runs(state_dir)
    runs[run_id] = {"run_dir": str(run_dir), "started": dt.datetime.now(dt.UTC).isoformat()}
    atomic_write_text(Path(state_dir) / RUNS_FILE, json.dumps(runs, indent=2) + "\n")
    return run_id, run_dir


def stop_run(state_dir: Path, run_id: str) -> None:
    """Ask the SuperLink to stop a run (``flwr stop``)."""
    _flwr(state_dir, "stop", run_id)


def run_status(state_dir: Path, run_id: str | None = None) -> dict[str, Any]:
    """Flower's status of the run (the newest one by default) and its last completed round."""
    runs = _runs(state_dir)
    if not runs:
        raise ConfigError(
            f"no runs were started from {state_dir}; start one with `pollinate server run`"
        )
    if run_id is None:
        run_id = max(runs, key=lambda r: runs[r]["started"])
    if run_id not in runs:
        raise ConfigError(
            f"run {run_id} was not started from {state_dir} (known: {', '.join(runs)})"
        )
    try:
        listed = _flwr(state_dir, "ls", options=("--run-id", run_id))["runs"]
        flower_status = listed[0]["status"] if listed else "unknown"
    except SuperLinkError as err:
        flower_status = f"unknown (SuperLink not reachable: {err})"
    run_dir = Path(runs[run_id]["run_dir"])
    report: dict[str, Any] = {"run_id": run_id, "status": flower_status, "run_dir": str(run_dir)}
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        rounds = json.loads(metrics_path.read_text())
        last = rounds[-1] if rounds else {}
        report["round"] = last.get("server_round", 0)
        for key in ("sampled", "replied", "declined", "failed", "accuracy"):
            report[key] = last.get(key)
    privacy_path = run_dir / "privacy.json"
    if privacy_path.is_file():
        summary = json.loads(privacy_path.read_text()).get("summary", {})
        report["max_epsilon"] = summary.get("sample_level", {}).get("max_epsilon")
        report["client_level_epsilon"] = summary.get("client_level", {}).get("epsilon")
    return report
