"""Process-wide settings the command line makes before torch or Flower loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

#: What Flower's telemetry module decided, in this process and in a child it starts.
PROBE = """
import subprocess, sys
import pollinate.cli.main  # the CLI's import makes its process-wide settings
import flwr.supercore.telemetry as telemetry
child = subprocess.run(
    [sys.executable, "-c", "import flwr.supercore.telemetry as t; print(t.FLWR_TELEMETRY_ENABLED)"],
    capture_output=True, text=True, check=True,
).stdout.strip()
print(telemetry.FLWR_TELEMETRY_ENABLED, child)
"""


def _probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    return out.stdout.split()


def test_flower_telemetry_is_off_in_the_cli_and_every_process_it_starts() -> None:
    """Flower would send a usage event from each of its processes; pollinate's command and
    the SuperLink, SuperNodes and ClientApps it starts inherit the switch turned off."""
    assert _probe() == ["0", "0"]


def test_a_user_who_sets_flower_telemetry_keeps_their_choice() -> None:
    assert _probe(FLWR_TELEMETRY_ENABLED="1") == ["1", "1"]
