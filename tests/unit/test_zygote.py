"""Bad input to the zygote (``pollinate edge zygote``, ``--zygote``): one clear message each.
The zygote itself runs in tests/integration/test_warm_executor.py."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.device.zygote import check_zygote, serve
from pollinate.errors import ConfigError


def test_a_daemon_refuses_a_path_where_no_zygote_listens(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no zygote listens there; .*pollinate edge zygote"):
        check_zygote(tmp_path / "nothing.sock")


def test_a_zygote_serves_warm_executors_only(tmp_path: Path) -> None:
    path = tmp_path / "z.sock"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        check_zygote(path)  # a socket: accepted
        with pytest.raises(ConfigError, match="drop --executor cold"):
            check_zygote(path, "cold")


def test_a_zygote_needs_a_folder_and_a_short_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        serve(tmp_path / "missing" / "z.sock")
    with pytest.raises(ConfigError, match="too long for a Unix socket"):
        serve(tmp_path / ("z" * 120 + ".sock"))


def test_an_attachment_without_its_zygote_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pollinate.device.zygote", "attach", str(tmp_path / "z.sock"),
         "--", "--runtime-api-address", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "pollinate edge zygote" in proc.stderr
