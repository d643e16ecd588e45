"""Real processes in tests: free loopback ports, starting and stopping process groups,
waiting for what they do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

POLLINATE = [sys.executable, "-m", "pollinate"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_group(process: subprocess.Popen[str], timeout: float = 30) -> int:
    """SIGTERM the process' group (it was started with start_new_session), SIGKILL after
    ``timeout``; returns its exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``cmd`` in its own session (so :func:`stop_group` reaches its children), its
    output appended to ``log``."""
    with log.open("a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)  # fmt: skip


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll ``check`` every 0.5 s; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


class Federation:
    """A real federation on loopback for a test: ``pollinate certs``, ``pollinate server
    start`` (TLS + SuperNode authentication) and ``devices`` ``pollinate edge run`` daemons.

    Use as a context manager; leaving it stops the daemons (SIGTERM, their exit codes in
    :attr:`codes`) and the server.
    """

    def __init__(
        self,
        root: Path,
        devices: int,
        *,
        server_args: Sequence[str] = (),
        device_args: Callable[[int], list[str]] = lambda i: [],
    ) -> None:
        from pollinate.server.superlink import flwr_env

        self.root, self.devices = root, devices
        self.certs, self.state, self.port = root / "certs", root / "state", free_port()
        self.server_log = root / "server.log"
        self.env = {**flwr_env(self.state), "OMP_NUM_THREADS": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # fmt: skip
        trust: list[str] = []
        for i in range(devices):
            trust += ["--trust", str(self.certs / "nodes" / f"node-{i}.pub")]
        self.server_cmd = [*POLLINATE, "server", "start", "--certs", str(self.certs),
                           "--state-dir", str(self.state), "--port", str(self.port),
                           *trust, *server_args]  # fmt: skip
        self._device_args = device_args
        self.server: subprocess.Popen[str] | None = None
        self.daemons: list[subprocess.Popen[str]] = []
        self.codes: list[int] = []

    def cli(self, *args: str, timeout: float = 300) -> str:
        """``pollinate ARGS`` against this federation; its stdout (the test fails on error)."""
        out = subprocess.run([*POLLINATE, *args], capture_output=True, text=True,
                             timeout=timeout, env=self.env)  # fmt: skip
        assert out.returncode == 0, (args, out.stderr)
        return out.stdout

    def device_dir(self, i: int) -> Path:
        return self.root / f"device-{i}"

    def daemon_command(self, i: int) -> list[str]:
        return [
            *POLLINATE, "edge", "run", "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs / "ca.crt"),
            "--key", str(self.certs / "nodes" / f"node-{i}"),
            "--state-dir", str(self.device_dir(i)),
            "--partition-id", str(i), "--num-partitions", str(self.devices),
            *self._device_args(i),
        ]  # fmt: skip

    def start_server(self, ready_count: int = 1) -> None:
        """Start ``pollinate server start``; wait for its ``ready_count``-th "SuperLink ready"."""
        self.server = spawn(self.server_cmd, self.server_log, self.env)
        ready = lambda: self.server_log.read_text().count("SuperLink ready") >= ready_count  # noqa: E731
        wait_until("the SuperLink", ready, 90)

    def online(self) -> bool:
        from pollinate.server.superlink import list_nodes

        try:
            return sum(n["status"] == "online" for n in list_nodes(self.state)) == self.devices
        except Exception:  # the SuperLink is still starting
            return False

    def __enter__(self) -> Federation:
        self.cli("certs", str(self.certs), "--nodes", str(self.devices), timeout=60)
        self.start_server()
        for i in range(self.devices):
            log = self.root / f"daemon-{i}.log"
            self.daemons.append(spawn(self.daemon_command(i), log, self.env))
        wait_until("the SuperNodes online", self.online, 120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.codes = [stop_group(d) for d in self.daemons]
        if self.server is not None:
            stop_group(self.server)

    def run(self, run_dir: Path, *args: str) -> str:
        """``pollinate server run --run-dir RUN_DIR ARGS``; the new run's id."""
        out = self.cli("server", "run", "--state-dir", str(self.state), "--run-dir",
                       str(run_dir), *args)  # fmt: skip
        return out.strip().splitlines()[-1]

    def status(self) -> dict[str, Any]:
        """``pollinate server status --json`` of the newest run."""
        report: dict[str, Any] = json.loads(
            self.cli("server", "status", "--state-dir", str(self.state), "--json", timeout=120)
        )
        return report


def rounds_done(run_dir: Path) -> int:
    """Rounds a run directory records (metrics.json has round 0, the initial model, first)."""
    path = run_dir / "metrics.json"
    return len(json.loads(path.read_text())) - 1 if path.exists() else 0
