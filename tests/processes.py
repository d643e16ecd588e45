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
from collections.abc import Callable
from pathlib import Path

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


def rounds_done(run_dir: Path) -> int:
    """Rounds a run directory records (metrics.json has round 0, the initial model, first)."""
    path = run_dir / "metrics.json"
    return len(json.loads(path.read_text())) - 1 if path.exists() else 0
