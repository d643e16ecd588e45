"""``pollinate server run|status|logs|stop|resume|pull``: training runs on a federation started
with ``pollinate server start``, through the flwr CLI (``flwr run / ls / log / stop``).

The ServerApp writes its run directory on the server (checkpoints, metrics.json,
privacy.json); ``STATE_DIR/runs.json`` remembers which run id writes where, so ``status`` can
report the rounds next to Flower's own run status.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_dir, atomic_write_text
from pollinate.config import bundle_dir
from pollinate.errors import ConfigError
from pollinate.ops.superlink import CONNECTION, SuperLinkError, _flwr, flwr_env
from pollinate.privacy.ledger_store import LEDGER_FILE, LedgerStore

__all__ = [
    "active_run",
    "default_app_dir",
    "pull_run",
    "resume_run",
    "run_logs",
    "run_status",
    "start_run",
    "stop_run",
    "toml_run_config",
    "toml_value",
]

# Flower run states in which a run's ServerApp may still be working.
_ACTIVE = ("pending", "starting", "running")

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


def toml_value(value: Any) -> str:
    """One run-config value as TOML: ``true``, ``3``, ``0.5``, ``"text"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def toml_run_config(values: dict[str, Any]) -> str:
    """``{"num-server-rounds": 3, "run-dir": "/x"}`` -> ``num-server-rounds=3 run-dir="/x"``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def _runs(state_dir: Path) -> dict[str, dict[str, Any]]:
    path = Path(state_dir) / RUNS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def start_run(
    state_dir: Path,
    app_dir: Path,
    config: dict[str, Any],
    *,
    resumed_from: str | None = None,
    triggers: list[str] | None = None,
) -> tuple[str, Path]:
    """Submit a run; returns its run id and run directory (``run-dir`` defaults under STATE).

    ``triggers`` (the retrain event files the run answers) are recorded in ``runs.json``.
    """
    from pollinate.config import RunSettings

    config = dict(config)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(config.get("run-dir") or Path(state_dir) / "runs" / stamp).resolve()
    config["run-dir"] = str(run_dir)
    settings = RunSettings.from_run_config(config)  # one ConfigError before anything is sent
    if settings.client_sampling.value == "poisson" and settings.client_dp.value != "none":
        raise ConfigError(
            "client-sampling='poisson' claims amplification by sampling, which needs coins the "
            "server never sees; a real federation's ServerApp draws them itself, so use "
            "client-sampling='fixed' (no amplification claimed) or `pollinate simulate`"
        )
    answer = _flwr(
        state_dir, "run", str(app_dir), options=("--run-config", toml_run_config(config))
    )
    run_id = str(answer["run-id"])
    runs = _runs(state_dir)
    entry: dict[str, Any] = {
        "run_dir": str(run_dir),
        "started": dt.datetime.now(dt.UTC).isoformat(),
    }
    if resumed_from is not None:
        entry["resumed_from"] = resumed_from
    if triggers:
        entry["triggers"] = triggers
    runs[run_id] = entry
    atomic_write_text(Path(state_dir) / RUNS_FILE, json.dumps(runs, indent=2) + "\n")
    return run_id, run_dir


def _known(state_dir: Path, run_id: str | None) -> tuple[str, dict[str, Any]]:
    """The run ``run_id`` (the newest by default) from runs.json, or one clear error."""
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
    return run_id, runs[run_id]


def active_run(state_dir: Path) -> str | None:
    """The newest run started from ``state_dir`` while Flower still runs it, else None."""
    runs = _runs(state_dir)
    if not runs:
        return None
    newest = max(runs, key=lambda r: runs[r]["started"])
    return newest if _active(_flower_status(state_dir, newest)) else None


def _active(status: str) -> bool:
    """Whether a Flower run status (``running``, ``finished:completed``...) may still work."""
    return status.split(":")[0] in _ACTIVE


def _flower_status(state_dir: Path, run_id: str) -> str:
    listed = _flwr(state_dir, "ls", options=("--run-id", run_id))["runs"]
    return str(listed[0]["status"]) if listed else "unknown"


def resume_run(
    state_dir: Path,
    app_dir: Path,
    run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[str, Path, int]:
    """Continue a run in its run directory from its last checkpoint, as a new Flower run.

    The settings come from the run directory's ``run.json`` (``overrides`` may change what a
    resume allows, such as the number of rounds); the ServerApp restores the model, strategy
    state, history, privacy ledger and client-level accountant from the newest checkpoint, and
    the devices keep their own accountants, so no epsilon is reset. A run that Flower still
    shows as active is stopped first. Returns (new run id, run directory, last completed round).
    """
    from pollinate.rundir.checkpoint import latest_checkpoint

    old_id, entry = _known(state_dir, run_id)
    run_dir = Path(entry["run_dir"])
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise ConfigError(
            f"run {old_id} has no {run_json} (it never started training); start a new run "
            "with `pollinate server run` instead"
        )
    try:
        config = dict(json.loads(run_json.read_text(encoding="utf-8"))["settings"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{run_json} is corrupt ({err}); start a new run instead") from err
    ckpt = latest_checkpoint(run_dir)
    done = ckpt.server_round if ckpt is not None else 0
    try:
        status = _flower_status(state_dir, old_id)
    except SuperLinkError as err:
        raise SuperLinkError(f"cannot resume run {old_id}: {err}") from err
    if _active(status):
        try:
            _flwr(state_dir, "stop", old_id)
        except SuperLinkError:
            # a SuperLink restarted after a crash finishes the runs it had in flight on its
            # own, possibly between our `ls` and `stop`; only a run still active is an error
            if _active(_flower_status(state_dir, old_id)):
                raise
    config.update(overrides or {})
    config.update({"resume": True, "run-dir": str(run_dir)})
    new_id, where = start_run(state_dir, app_dir, config, resumed_from=old_id)
    return new_id, where, done


def run_logs(state_dir: Path, run_id: str | None = None, *, follow: bool = False) -> int:
    """Print the run's logs from the SuperLink (``flwr log``); returns flwr's exit code."""
    run_id, _ = _known(state_dir, run_id)
    flwr = str(Path(sys.executable).parent / "flwr")
    mode = "--stream" if follow else "--show"
    return subprocess.run(
        [flwr, "log", run_id, CONNECTION, mode], env=flwr_env(state_dir), check=False
    ).returncode


def pull_run(state_dir: Path, dest: Path, run_id: str | None = None) -> Path:
    """Copy a run's results to ``dest/run-ID``: run.json, metrics.json, privacy.json, the
    ledger database, the summary, the newest checkpoint and the exported bundle (``bundle/`` and
    ``bundle.tar.gz``, when the run exported one).

    The copy is assembled in a hidden folder beside the target and renamed into place, so
    ``dest`` never holds half a pull; an existing pull of the same run is replaced.
    """
    run_id, entry = _known(state_dir, run_id)
    run_dir = Path(entry["run_dir"])
    if not run_dir.is_dir():
        raise ConfigError(f"run {run_id}'s directory {run_dir} does not exist on this server")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"run-{run_id}"
    with atomic_dir(target, replace=True) as partial:
        for item in sorted(run_dir.iterdir()):
            if item.name == LEDGER_FILE:  # the round being written is not half-copied
                LedgerStore(item).copy_to(partial / item.name)
            elif item.is_file() and not item.name.startswith(".") and "sqlite-" not in item.name:
                shutil.copy2(item, partial / item.name)
        pointer = run_dir / "LATEST"
        if pointer.is_file():
            latest = run_dir / pointer.read_text(encoding="utf-8").strip()
            shutil.copytree(latest, partial / "checkpoints" / latest.name)
        settings = _saved_settings(run_dir)
        bundle = bundle_dir(run_dir, str(settings.get("export-dir") or ""),
                            str(settings.get("export-triton-repo") or ""))  # fmt: skip
        if bundle is not None and bundle.is_dir():  # the bundle and its archive beside it
            shutil.copytree(bundle, partial / "bundle", symlinks=True)
            archive = bundle.parent / f"{bundle.name}.tar.gz"
            if archive.is_file():
                shutil.copy2(archive, partial / "bundle.tar.gz")
    return target


def _saved_settings(run_dir: Path) -> dict[str, Any]:
    try:
        settings = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def stop_run(state_dir: Path, run_id: str) -> None:
    """Ask the SuperLink to stop a run (``flwr stop``)."""
    _flwr(state_dir, "stop", run_id)


def run_status(state_dir: Path, run_id: str | None = None) -> dict[str, Any]:
    """Flower's status of the run (the newest one by default) and its last completed round."""
    run_id, entry = _known(state_dir, run_id)
    try:
        flower_status = _flower_status(state_dir, run_id)
    except SuperLinkError as err:
        flower_status = f"unknown (SuperLink not reachable: {err})"
    run_dir = Path(entry["run_dir"])
    report: dict[str, Any] = {"run_id": run_id, "status": flower_status, "run_dir": str(run_dir)}
    if "resumed_from" in entry:
        report["resumed_from"] = entry["resumed_from"]
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        rounds = json.loads(metrics_path.read_text())
        last = rounds[-1] if rounds else {}
        report["round"] = last.get("server_round", 0)
        for key in ("sampled", "replied", "declined", "failed", "accuracy"):
            report[key] = last.get(key)
        if last.get("metrics"):  # the task's (and the user's) central metrics
            report["metrics"] = last["metrics"]
    privacy_path = run_dir / "privacy.json"
    if privacy_path.is_file():
        summary = json.loads(privacy_path.read_text()).get("summary", {})
        report["max_epsilon"] = summary.get("sample_level", {}).get("max_epsilon")
        report["client_level_epsilon"] = summary.get("client_level", {}).get("epsilon")
    return report
