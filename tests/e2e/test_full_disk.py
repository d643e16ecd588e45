"""A run directory on a full disk (a 400 KiB tmpfs): one clear line and the checkpoint exit
code, nothing half-written, and the run resumes where it stopped once there is room."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pollinate.errors import ExitCode
from pollinate.privacy import PrivacyLedger
from pollinate.privacy.ledger_store import LEDGER_FILE, LedgerStore
from tests.support.simulation import simulate

pytestmark = pytest.mark.slow

ARGS = ("--num-clients", "1000", "--partitioner", "resample", "--set", "samples-per-client=4",
        "--fraction", "0.1", "--rounds", "2", "--model", "mlp")  # fmt: skip


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
        capture_output=True, check=False,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_cleanly_and_it_resumes_elsewhere(
    tmp_path: Path, small_disk: Path
) -> None:
    run_dir = small_disk / "run"
    proc = simulate(tmp_path, *ARGS, "--run-dir", str(run_dir))
    assert proc.returncode == ExitCode.CHECKPOINT, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "No space left on device" in error[0], proc.stderr[-2000:]
    assert "--resume" in error[0] and "Traceback" not in proc.stderr
    # nothing half-written: no checkpoint folder, no temporary left behind
    assert not list((run_dir / "checkpoints").iterdir())
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".")]

    # moved to a disk with room, the run resumes and its ledger holds each round once
    roomy = tmp_path / "run"
    shutil.copytree(run_dir, roomy)
    proc = simulate(tmp_path, "--resume", str(roomy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((roomy / "metrics.json").read_text())
    assert [m["server_round"] for m in metrics] == [0, 1, 2]
    ledger = PrivacyLedger.from_store(LedgerStore(roomy / LEDGER_FILE))
    assert sorted({e.server_round for e in ledger.entries}) == [1, 2]
    assert len(ledger.entries) == 200
