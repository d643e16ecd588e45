"""Tracking never fails or slows a run: failing and slow tracking servers, in-process.

The tracker's MLflow client is swapped for a small stand-in whose calls fail or block (the
real server is tests/integration/test_tracking_mlflow.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pollinate.rundir import tracking
from pollinate.rundir.records import RoundRecord

pytest.importorskip("mlflow")


class FlakyClient:
    """An MlflowClient stand-in: runs start; logging metrics fails or waits on ``gate``."""

    def __init__(self, *, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.fail = fail
        self.gate = gate
        self.batches = 0
        self.terminated = False

    def get_experiment_by_name(self, name: str) -> None:
        return None

    def create_experiment(self, name: str) -> str:
        return "1"

    def create_run(self, experiment_id: str, **_: Any) -> Any:
        return SimpleNamespace(info=SimpleNamespace(run_id="r1"))

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = ()) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail and metrics:
            raise ConnectionError("connection refused")
        self.batches += 1

    def log_artifact(self, *_: Any) -> None:
        pass

    def set_terminated(self, run_id: str, status: str) -> None:
        self.terminated = True


def _record(rnd: int) -> RoundRecord:
    return RoundRecord(server_round=rnd, accuracy=0.5, loss=1.0, sampled=4, replied=4)


def _tracker(monkeypatch: pytest.MonkeyPatch, client: FlakyClient, run_dir: Path) -> Any:
    monkeypatch.setattr(tracking, "mlflow_client", lambda _uri: client)
    monkeypatch.setattr(tracking, "BACKOFF_S", 0.01)
    return tracking.open_tracker(run_dir, "http://tracking.invalid", {"seed": 1})


def test_failing_calls_are_retried_then_one_warning_and_a_count(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = FlakyClient(fail=True)
    tracker = _tracker(monkeypatch, client, tmp_path)
    with caplog.at_level(logging.DEBUG, logger="pollinate"):
        for rnd in (1, 2, 3):
            tracker.log_round(_record(rnd))
        tracker.finish(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # the first failure, and the count at the end
    assert "connection refused" in warnings[0]
    assert "3 calls" in warnings[1]
    assert client.terminated  # the rest still went through
    assert json.loads((tmp_path / tracking.TRACKING_FILE).read_text())["run_id"] == "r1"


def test_a_stuck_server_never_blocks_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    monkeypatch.setattr(tracking, "QUEUE_SIZE", 4)
    tracker = _tracker(monkeypatch, FlakyClient(gate=gate), tmp_path)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        for rnd in range(1, 50):
            tracker.log_round(_record(rnd))
    assert time.monotonic() - start < 1.0
    dropped = [r for r in caplog.records if "too slow" in r.getMessage()]
    assert len(dropped) == 1
    gate.set()
    tracker.finish(tmp_path)


def test_off_is_no_tracking(tmp_path: Path) -> None:
    tracker = tracking.open_tracker(tmp_path, "off", {"seed": 1})
    tracker.log_round(_record(1))
    tracker.finish(tmp_path)
    assert tracker.run_id is None
    assert not (tmp_path / tracking.TRACKING_FILE).exists()
