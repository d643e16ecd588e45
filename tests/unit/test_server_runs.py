"""`pollinate server run/status` before anything reaches a SuperLink: run config and errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from pollinate.server.runs import toml_run_config


def test_run_config_is_valid_toml_with_the_right_types() -> None:
    values = {"num-server-rounds": 3, "fraction-train": 0.5, "resume": True,
              "run-dir": '/tmp/a "b"', "strategy": "fedavg"}  # fmt: skip
    text = toml_run_config(values)
    parsed = tomllib.loads("\n".join(f"{k} = {v}" for k, v in (p.split("=", 1) for p in
                                                                  _split(text))))  # fmt: skip
    assert parsed == values


def _split(text: str) -> list[str]:
    """Split on spaces outside quotes (what flwr does with --run-config)."""
    parts, current, quoted = [], "", False
    for ch in text:
        if ch == '"' and not current.endswith("\\\\"):
            quoted = not quoted
        if ch == " " and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pollinate", "server", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_bad_settings_fail_before_anything_is_sent(tmp_path: Path) -> None:
    bad = _cli("run", "--state-dir", str(tmp_path), "--rounds", "0")
    assert bad.returncode == 2 and "num-server-rounds" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    unknown = _cli("run", "--state-dir", str(tmp_path), "--set", "no-such-key=1")
    assert unknown.returncode == 2 and "no-such-key" in unknown.stderr, unknown.stderr
    none = _cli("status", "--state-dir", str(tmp_path))
    assert none.returncode == 2 and "no runs were started" in none.stderr
