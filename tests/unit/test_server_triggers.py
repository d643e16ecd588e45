"""Retrain events from `pollinate serve`, consumed by `pollinate server run --trigger-dir`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pollinate.ops.triggers import claim_triggers, describe, record, release
from pollinate.serving.drift import DriftReading, TriggerSink, read_triggers


def _emit(folder: Path, model: str = "cnn", version: int = 3, psi: float = 0.5) -> Path:
    reading = DriftReading(model=model, version=version, samples=1000, input_psi=psi,
                           output_psi=psi / 2, threshold=0.2, drifted=True)  # fmt: skip
    path = TriggerSink(folder, None).emit(reading)
    assert path is not None
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pollinate", "server", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})  # fmt: skip


def test_claim_takes_every_pending_event_once_and_release_puts_them_back(tmp_path: Path) -> None:
    first, second = _emit(tmp_path, version=3), _emit(tmp_path, model="digits", version=5)
    (tmp_path / "retrain-broken.json").write_text("{not json")
    claims = claim_triggers(tmp_path)
    assert [c.pending for c in claims] == [first, second]  # oldest first
    assert all(c.path.parent == tmp_path / "consumed" and c.path.is_file() for c in claims)
    assert [e["model"] for e in read_triggers(tmp_path)] == []  # none pending any more
    assert claim_triggers(tmp_path) == []  # a second consumer gets nothing
    assert describe(claims) == (
        "cnn v3 (PSI input 0.50, output 0.25), digits v5 (PSI input 0.50, output 0.25)"
    )
    release(claims)
    assert [e["version"] for e in read_triggers(tmp_path)] == [3, 5]
    assert sorted(os.listdir(tmp_path / "consumed")) == []


def test_record_stamps_the_run_id_into_the_consumed_event(tmp_path: Path) -> None:
    _emit(tmp_path)
    claims = claim_triggers(tmp_path)
    record(claims, "8421")
    event = json.loads(claims[0].path.read_text())
    assert event["run_id"] == "8421" and event["model"] == "cnn" and event["psi"]["input"] == 0.5
    assert event["consumed"].endswith("Z")
    assert claim_triggers(tmp_path / "missing") == []  # `pollinate serve` has not made it yet


def test_server_run_without_a_pending_event_starts_nothing(tmp_path: Path) -> None:
    triggers = tmp_path / "triggers"
    triggers.mkdir()
    proc = _cli("run", "--state-dir", str(tmp_path), "--trigger-dir", str(triggers))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "no retrain event pending" in proc.stderr
    missing = _cli("run", "--state-dir", str(tmp_path), "--trigger-dir", str(tmp_path / "nope"))
    assert missing.returncode == 0 and "does not exist yet" in missing.stderr, missing.stderr
    alone = _cli("run", "--state-dir", str(tmp_path), "--wait")
    assert alone.returncode == 2 and "pass --trigger-dir" in alone.stderr, alone.stderr


def test_an_event_is_not_lost_when_the_run_cannot_start(tmp_path: Path) -> None:
    triggers = tmp_path / "triggers"
    path = _emit(triggers)
    # no `pollinate server start` ever ran in this state directory: the run cannot start
    proc = _cli("run", "--state-dir", str(tmp_path / "state"), "--trigger-dir", str(triggers))
    assert proc.returncode == 10 and "retraining for 1 event(s): cnn v3" in proc.stderr
    assert "is not the state directory of a federation" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert path.is_file() and not (triggers / "consumed" / path.name).exists()
    bad = _cli("run", "--state-dir", str(tmp_path), "--trigger-dir", str(triggers), "--set",
               "export-triton-repo=models", "--set", "export-formats=openvino")  # fmt: skip
    assert bad.returncode == 2 and "export-triton-repo" in bad.stderr, bad.stderr
    assert path.is_file()
