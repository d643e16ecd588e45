"""`pollinate serve` on the command line: help, and bad set-ups that fail fast and clearly."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _serve(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pollinate", "serve", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=cwd,
    )  # fmt: skip


def test_serve_help_has_examples_and_the_flags(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    proc = _serve(e2e_env, tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--repository", "--http-port", "--grpc-port", "--metrics-port", "--device",
                 "--instances", "--max-batch-size", "--max-queue-delay-us", "--canary-percent",
                 "--config", "--token-file", "--tls-cert", "--workers", "Examples"):  # fmt: skip
        assert flag in proc.stdout, flag


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--repository", "missing"), 9, "model repository .*missing does not exist"),
        ((), 2, "no model repository given"),
        (("--repository", ".", "--device", "tpu"), 2, "device must be one of auto, cpu, cuda"),
        (("--repository", ".", "--config", "nope.toml"), 2, "cannot read config file nope.toml"),
        (("--repository", ".", "--max-queue-size", "8"), 2, "at least max-batch-size"),
        (("--repository", "missing", "--workers", "2"), 9, "repository .*missing does not exist"),
        (("--repository", ".", "--workers", "0"), 2, "workers must be positive"),
    ],
)
def test_bad_setups_fail_with_one_message_and_an_exit_code(
    tmp_path: Path, e2e_env: dict[str, str], args: tuple[str, ...], code: int, message: str
) -> None:
    proc = _serve(
        e2e_env, tmp_path, *args, "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"
    )
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    import re

    assert len(re.findall(message, proc.stderr)) == 1, proc.stderr  # one message, not per worker


def test_a_busy_port_is_a_clear_error(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    (tmp_path / "repo").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for workers in ("1", "2"):  # --workers shares ports with its workers, never with others
            proc = _serve(e2e_env, tmp_path, "--repository", "repo", "--workers", workers,
                          "--http-port", str(port), "--grpc-port", "0",
                          "--metrics-port", "0")  # fmt: skip
            assert proc.returncode != 0
            assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
