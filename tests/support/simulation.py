"""``pollinate simulate`` run as a user runs it, for the tests of real simulations.

Example::

    proc = simulate(tmp_path, "--preset", "quick", "--rounds", "1", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.processes import POLLINATE

ENV = {
    **os.environ,
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "160",
}
"""The environment of a simulation (this process' environment, as it was at import)."""


def simulate_env(tmp: Path) -> dict[str, str]:
    """:data:`ENV` with Flower's home in ``tmp/.flwr``."""
    return {**ENV, "FLWR_HOME": str(tmp / ".flwr")}


def simulate_command(*args: str) -> list[str]:
    """The command line of ``pollinate simulate ARGS``."""
    return [*POLLINATE, "simulate", *args]


def simulate(
    tmp: Path, *args: str, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``pollinate simulate ARGS`` to its end (Flower's home in ``tmp/.flwr``, in folder
    ``cwd``); its output captured as text."""
    return subprocess.run(
        simulate_command(*args), capture_output=True, text=True, timeout=timeout,
        env=simulate_env(tmp), cwd=cwd,
    )  # fmt: skip


def simulate_and_kill(tmp: Path, run_dir: Path, *args: str, after_round: int = 2) -> int:
    """Start ``pollinate simulate ARGS --run-dir RUN_DIR`` and kill its process group as
    soon as round ``after_round``'s checkpoint is written (a crash mid-run); returns the
    round of the last checkpoint. Fails if the run ends before it could be killed."""
    from pollinate.rundir.checkpoint import latest_checkpoint
    from tests.support.processes import kill_group, spawn, wait_until

    child = spawn(
        simulate_command(*args, "--run-dir", str(run_dir)), tmp / f"{run_dir.name}.log",
        simulate_env(tmp),
    )  # fmt: skip

    def saved() -> bool:
        ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
        if ckpt is not None and ckpt.server_round >= after_round:
            return True
        assert child.poll() is None, "the run ended before it could be killed"
        return False

    try:
        wait_until(f"round {after_round}'s checkpoint", saved, 300, interval=0.01)
    finally:
        kill_group(child)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    return ckpt.server_round
