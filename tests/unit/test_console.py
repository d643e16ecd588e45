"""pollinate.cli.console: rich on a terminal, one plain line a message anywhere else."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.cli.console import is_plain, make_console, one_line


class _Stream(io.StringIO):
    def __init__(self, tty: bool | None) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        if self.tty is None:
            raise ValueError("I/O operation on closed file")
        return self.tty


def test_only_a_real_terminal_that_is_not_dumb_gets_rich_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("FORCE_COLOR", "1")  # asks for colours, does not make a pipe a terminal
    assert not is_plain(_Stream(tty=True))
    assert is_plain(_Stream(tty=False))
    assert is_plain(_Stream(tty=None))  # closed
    assert is_plain(object())  # no isatty at all
    monkeypatch.setenv("TERM", "dumb")
    assert is_plain(_Stream(tty=True))


def test_no_color_is_honoured_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    for unset in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(unset, raising=False)
    monkeypatch.setattr(sys, "stdout", _Stream(tty=True))
    make_console().print("[red]red[/]")
    assert "\x1b[31m" in sys.stdout.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(sys, "stdout", _Stream(tty=True))
    make_console().print("[red]red[/]")
    assert sys.stdout.getvalue() == "red\n"


def test_one_line_joins_line_breaks_only() -> None:
    assert one_line("  cannot read x:\n   line two\r\nthree  ") == "cannot read x: line two three"
    assert one_line("keeps  two spaces") == "keeps  two spaces"


SCRIPT = """
import logging, sys
from pollinate.cli._common import setup_logging
from pollinate.cli.console import make_console
long = sys.argv[1]
setup_logging(False)
logging.getLogger("pollinate.data").warning("%s is large; reading it\\ntakes a while", long)
out = make_console(min_width=120)
out.print(f"final accuracy [bold]0.9123[/] after round 3")
out.print(f"run directory: {long}")
"""


def test_warnings_and_summary_lines_are_one_line_in_a_pipe(tmp_path: Path) -> None:
    long = str(tmp_path / "a folder with spaces" / ("x" * 60) / ("y" * 60) / "run")
    assert len(long) > 150
    env = {**os.environ, "COLUMNS": "40"}
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, long],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"warning: {long} is large; reading it takes a while"]
    assert proc.stdout.splitlines() == [
        "final accuracy 0.9123 after round 3",
        f"run directory: {long}",
    ]
