"""`flwr run .` in the repository root runs pollinate's ServerApp and ClientApp, and so does
an app `pollinate new` makes (with the user's model and data in its own task.py).

Flower 1.42's `flwr run` starts a local SuperLink on first use and leaves it running after
it returns. The fixture gives that SuperLink its own FLWR_HOME and its own free port (so it
never meets a SuperLink of another test or user on the default port 39091), lets this
module's tests share it, and stops it, with every process it started, at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from flwr.cli.config_migration import CONFIG_MIGRATION_NOTICE

from tests.support import REPO
from tests.support.processes import (
    POLLINATE,
    cmdline,
    end_processes,
    free_port,
    processes_mentioning,
)

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent

NUM_SUPERNODES = 10
ROUNDS = 2


@dataclass(frozen=True)
class LocalFlower:
    env: dict[str, str]
    home: Path
    port: int


def _processes_of(flower: LocalFlower) -> dict[int, psutil.Process]:
    """The local SuperLink started for this test, and every process below it.

    The SuperLink is recognised by its command line, which names this test's FLWR_HOME (its
    log file and database) and port; the SuperExec and the simulation process it starts name
    the same port in ``--runtime-api-address``.
    """
    return processes_mentioning((str(flower.home), f"127.0.0.1:{flower.port}"))


def _stop(flower: LocalFlower) -> list[str]:
    """Terminate the local SuperLink and its descendants; return what survived a SIGKILL."""
    survivors = end_processes(list(_processes_of(flower).values()), timeout=15, kill_timeout=10)
    return [f"pid {p.pid}: {cmdline(p)}" for p in survivors]


@pytest.fixture(scope="module")
def local_flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFlower]:
    port = free_port()
    home = tmp_path_factory.mktemp("flower") / ".flwr"
    flower = LocalFlower(
        env={
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "COLUMNS": "200",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
            # Deprecated in 1.42 but still passed to flower-superlink: keep it off 39093 too.
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        },
        home=home,
        port=port,
    )
    yield flower
    survivors = _stop(flower)
    assert not survivors, f"processes left behind: {survivors}"
    assert not _processes_of(flower), "the local SuperLink is still running"


def _git_status() -> list[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=normal"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.splitlines()


def _new_top_level_files(before: list[str], after: list[str]) -> list[str]:
    """Untracked files that appeared directly in the repository root (where `flwr run` is).

    Changes to tracked files and inside folders are left out: other work may edit the
    package, tests, docs or README while this test runs, and `flwr run` only reads them
    (pyproject.toml, the one file it may rewrite, is checked on its own).
    """
    fresh = set(after) - set(before)
    return sorted(line for line in fresh if line.startswith("??") and "/" not in line[3:])


def test_flwr_run_runs_the_server_and_client_apps(
    local_flower: LocalFlower, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    pyproject = REPO / "pyproject.toml"
    # flwr 1.42 rewrites pyproject.toml only to migrate a [tool.flwr.federations] table.
    assert "federations" not in tomllib.loads(pyproject.read_text())["tool"]["flwr"]
    status_before = _git_status()

    proc = subprocess.run(
        [
            str(VENV_BIN / "flwr"), "run", ".",
            "--run-config", f'num-server-rounds={ROUNDS} run-dir="{run_dir}"',
            "--federation-config", f"num-supernodes={NUM_SUPERNODES}",
            "--stream",
        ],
        cwd=REPO, env=local_flower.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    assert "Successfully started run" in proc.stdout, log
    assert f"127.0.0.1:{local_flower.port}" in proc.stdout, log
    # The SuperLink flwr started belongs to this test (its log is in this FLWR_HOME) and
    # outlives `flwr run`: the fixture must find it to stop it.
    assert (local_flower.home / "local-superlink" / "superlink.log").exists()
    assert any("flower-superlink" in cmdline(p) for p in _processes_of(local_flower).values())

    # The run directory pollinate's ServerApp writes.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["server_round"] for m in metrics] == list(range(ROUNDS + 1)), log
    for m in metrics[1:]:
        assert m["sampled"] >= 2
        assert m["replied"] == m["sampled"], m
        assert m["failed"] == 0, m
    assert metrics[-1]["accuracy"] is not None

    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["population"] == NUM_SUPERNODES, "--federation-config did not size it"
    assert run_json["settings"]["num-server-rounds"] == ROUNDS
    assert run_json["settings"]["run-dir"] == str(run_dir)

    privacy = json.loads((run_dir / "privacy.json").read_text())
    sample = privacy["summary"]["sample_level"]
    assert sample["enabled"] is True
    assert sample["max_epsilon"] > 0
    assert sample["clients"] >= 2
    client_files = list((run_dir / "clients").glob("*.accountant.json"))
    assert len(client_files) == sample["clients"]

    latest = (run_dir / "LATEST").read_text().strip()
    assert latest == f"checkpoints/round-{ROUNDS:04d}"
    assert (run_dir / latest / "model.safetensors").exists()
    summary = (run_dir / "summary.md").read_text()
    assert "num-server-rounds" in summary

    # `flwr run` left the repository alone. Its only rewrite of pyproject.toml (the migration
    # of [tool.flwr.federations]) writes a notice and comments the table out: neither is
    # there. (Not a byte comparison: the file may be edited by other work while this runs.)
    text = pyproject.read_text()
    assert CONFIG_MIGRATION_NOTICE.strip() not in text
    assert "tool.flwr.federations" not in text
    assert "federations" not in tomllib.loads(text)["tool"]["flwr"]
    status_after = _git_status()
    assert _new_top_level_files(status_before, status_after) == []


def test_an_app_pollinate_new_makes_runs_with_its_own_model_pytest_simulate_and_flwr_run(
    local_flower: LocalFlower, tmp_path: Path
) -> None:
    app = tmp_path / "my-app"
    made = subprocess.run(
        [*POLLINATE, "new", "my-app", "--dir", str(app)], capture_output=True, text=True,
        timeout=60, env=local_flower.env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert config["components"]["clientapp"] == "pollinate.clientapp.app:app"
    assert config["config"]["model"] == "my_app.task:Net"
    # its own test passes as made
    tested = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=app,
        capture_output=True, text=True, timeout=120, env=local_flower.env,
    )  # fmt: skip
    assert tested.returncode == 0 and "1 passed" in tested.stdout, tested.stdout[-2000:]
    # `pollinate simulate --app` from elsewhere: the app's config and code
    sim_dir = tmp_path / "sim"
    sim = subprocess.run(
        [*POLLINATE, "simulate", "--app", str(app), "--rounds", "1", "--run-dir", str(sim_dir)],
        capture_output=True, text=True, timeout=300, env=local_flower.env, cwd=tmp_path,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr[-3000:]
    run = json.loads((sim_dir / "run.json").read_text())
    assert run["population"] == 10  # [tool.pollinate] num-clients
    assert run["settings"]["dataset"] == "my_app.task:load_data"
    assert run["settings"]["batch-size"] == 16  # the app's config, not the preset's
    # `flwr run .` inside it, on this module's local SuperLink
    run_dir = tmp_path / "flwr"
    proc = subprocess.run(
        [str(VENV_BIN / "flwr"), "run", ".", "--run-config",
         f'num-server-rounds=1 run-dir="{run_dir}"', "--stream"],
        cwd=app, env=local_flower.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["server_round"] for m in metrics] == [0, 1], log
    assert metrics[1]["replied"] == metrics[1]["sampled"] >= 2, metrics
    assert json.loads((run_dir / "run.json").read_text())["settings"]["model"] == "my_app.task:Net"
    assert (
        json.loads((run_dir / "privacy.json").read_text())["summary"]["sample_level"]["max_epsilon"]
        > 0
    )
