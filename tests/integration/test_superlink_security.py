"""`pollinate certs` + `pollinate server start`: a real SuperLink with TLS and SuperNode
authentication, real `flower-supernode` processes on loopback.

Registered SuperNodes connect; an unknown key and a plaintext connection are refused; a
restarted SuperLink keeps its registered nodes (its database is on disk).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pollinate.ops.superlink import flwr_env, list_nodes
from tests.support.processes import (
    POLLINATE,
    exited,
    free_port,
    spawn,
    stop_group,
    terminate,
    wait_until,
)

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@contextmanager
def _server(tmp: Path, port: int, *trust: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`pollinate server start` until the block ends; then SIGTERM to it alone (it stops its
    own children), SIGKILL after 30 s."""
    args = ["--certs", str(tmp / "certs"), "--state-dir", str(tmp / "state"), "--port", str(port)]
    for key in trust:
        args += ["--trust", str(key)]
    log = tmp / f"server-{time.monotonic_ns()}.out"
    process = spawn([*POLLINATE, "server", "start", *args], log, flwr_env(tmp / "state"))

    def ready() -> bool:
        if "SuperLink ready" in log.read_text():
            return True
        assert process.poll() is None, log.read_text()
        return False

    try:
        wait_until("the SuperLink to start", ready, 90, interval=0.2)
        yield process
    finally:
        terminate(process, timeout=30)


def _supernode(
    tmp: Path, port: int, key: Path | None, name: str, *extra: str
) -> subprocess.Popen[bytes]:
    args = [
        "--superlink",
        f"127.0.0.1:{port}",
        "--port",
        str(free_port()),
        "--max-retries",
        "3",
        *extra,
    ]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    if "--insecure" not in extra:
        args += ["--root-certificates", str(tmp / "certs" / "ca.crt")]
    return spawn([str(BIN / "flower-supernode"), *args], tmp / f"{name}.log", flwr_env(tmp / name))


def _online(state: Path) -> set[str]:
    return {n["node-id"] for n in list_nodes(state) if n["status"] == "online"}


def test_only_trusted_supernodes_connect_and_only_over_tls(tmp_path: Path) -> None:
    made = subprocess.run(
        [*POLLINATE, "certs", str(tmp_path / "certs"), "--nodes", "3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    nodes = tmp_path / "certs" / "nodes"
    for private in ("node-0", "node-1", "node-2"):
        assert stat.S_IMODE((nodes / private).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "certs" / "server.key").stat().st_mode) == 0o600
    again = subprocess.run(
        [*POLLINATE, "certs", str(tmp_path / "certs")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 2 and "never overwrites" in again.stderr

    port = free_port()
    state = tmp_path / "state"
    with _server(tmp_path, port, nodes / "node-0.pub", nodes / "node-1.pub"):
        registered = {n["node-id"] for n in list_nodes(state)}
        assert len(registered) == 2
        trusted = [_supernode(tmp_path, port, nodes / f"node-{i}", f"trusted-{i}") for i in (0, 1)]
        stranger = _supernode(tmp_path, port, nodes / "node-2", "stranger")
        plaintext = _supernode(tmp_path, port, nodes / "node-0", "plaintext", "--insecure")
        try:
            wait_until(
                "the trusted SuperNodes online", lambda: _online(state) == registered, 60,
                error=lambda msg: AssertionError(f"{msg}; online: {_online(state)}"),
            )  # fmt: skip
            # the unknown key and the plaintext client are turned away and give up
            assert stranger.wait(timeout=60) != 0
            assert plaintext.wait(timeout=60) != 0
            assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text()
            assert {n["node-id"] for n in list_nodes(state)} == registered  # nobody new joined
        finally:
            for p in (*trusted, stranger, plaintext):
                stop_group(p)

    # restarted on the same state directory, the SuperLink still knows its nodes
    with _server(tmp_path, port, nodes / "node-0.pub") as server:  # node-0: already trusted
        assert {n["node-id"] for n in list_nodes(state)} == registered
        # the SuperExec that launches ServerApps is supervised: killed, it is started again
        # (with back-off) and takes the next run
        assert stat.S_IMODE((state / "superexec.secret").stat().st_mode) == 0o600
        first = _superexec(state, lambda info: info["superexec_pid"] is not None)
        os.kill(first["superexec_pid"], signal.SIGKILL)
        again = _superexec(state, _restarted_once)
        assert again["superexec_pid"] != first["superexec_pid"]
        env = {**flwr_env(state), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        started = subprocess.run(
            [*POLLINATE, "server", "run", "--state-dir", str(state),
             "--rounds", "1", "--run-dir", str(tmp_path / "run")],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        # no SuperNode is online: the ServerApp waits for one
        wait_until(
            "the run to be running", lambda: _status(state, env) == "running", 120,
            interval=1.0, error=lambda msg: AssertionError(f"{msg}: {_status(state, env)}"),
        )  # fmt: skip
    assert server.returncode == 0, "SIGTERM must stop the SuperLink cleanly"
    assert exited(again["superexec_pid"]), "the SuperExec stops with the SuperLink"


def _superexec(state: Path, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """superlink.json once ``ready`` says yes to it (polled every 0.5 s, for 60 s)."""
    info: dict[str, Any] = {}

    def read() -> bool:
        nonlocal info
        info = json.loads((state / "superlink.json").read_text())
        return ready(info)

    wait_until("the SuperExec", read, 60, error=lambda msg: AssertionError(f"{msg}: {info}"))
    return info


def _restarted_once(info: dict[str, Any]) -> bool:
    """The SuperExec was restarted once and its successor is running."""
    return info["superexec_restarts"] == 1 and info["superexec_pid"] is not None


def _status(state: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        [*POLLINATE, "server", "status", "--state-dir", str(state),
         "--json"], capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["status"])
