"""A real ``mlflow server`` on loopback for the tracking and registry tests.

It is the venv's own ``mlflow`` executable (beside this interpreter), with a SQLite backend
and a local artifact store in a temporary folder, one worker; :func:`start_mlflow` waits
until its health endpoint answers.

Example::

    server = start_mlflow(tmp_path)
    try:
        ...  # --tracking-uri server.uri
    finally:
        server.stop()
"""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from tests.support.processes import StartError, free_port, log_tail, spawn, stop_group, wait_until

MLFLOW = Path(sys.executable).parent / "mlflow"
"""The ``mlflow`` command of this interpreter's environment."""


@dataclass
class MlflowServer:
    """A running ``mlflow server``: its URI, process and log."""

    uri: str
    process: Popen[bytes]
    log: Path

    def stop(self) -> None:
        """Stop the server and its workers."""
        stop_group(self.process, timeout=3)


def _healthy(uri: str, process: Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise StartError(f"mlflow server exited ({process.returncode}):\n{log_tail(log)}")
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_mlflow(root: Path, timeout: float = 90.0) -> MlflowServer:
    """Start ``mlflow server`` with its database and artifacts under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "mlflow-server.log"
    cmd = [
        str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    process = spawn(cmd, log, env, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until("mlflow server", lambda: _healthy(uri, process, log), timeout, error=StartError)
    except BaseException:
        stop_group(process, timeout=5)
        raise
    return MlflowServer(uri=uri, process=process, log=log)
