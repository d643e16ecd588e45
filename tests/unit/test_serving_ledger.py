"""The roll-out ledger that keeps the workers of `pollinate serve --workers N` in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollinate.serving.ledger import RolloutLedger
from pollinate.serving.repository import VersionFiles


def _files(version: int, mtime: int = 1) -> VersionFiles:
    path = Path(f"/repo/cnn/{version}")
    return VersionFiles(model="cnn", version=version, path=path, onnx=path / "model.onnx",
                        safetensors=None, torch_spec=None,
                        fingerprint=(("model.onnx", 1000 + version, mtime),))  # fmt: skip


def test_followers_see_the_leaders_decision_for_the_same_files_only(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    leader, follower = RolloutLedger(path, leader=True), RolloutLedger(path, leader=False)
    assert follower.outcome("cnn", _files(4)) is None  # nothing decided yet
    leader.record("cnn", _files(3), "promoted")
    leader.record("cnn", _files(4), "rolled_back")
    assert follower.outcome("cnn", _files(3)) == "promoted"
    assert follower.outcome("cnn", _files(4)) == "rolled_back"
    assert follower.outcome("cnn", _files(4, mtime=2)) is None  # re-published: judged again
    assert follower.outcome("other", _files(3)) is None
    with pytest.raises(RuntimeError, match="only worker 0"):
        follower.record("cnn", _files(5), "promoted")


def test_a_starting_worker_serves_the_newest_promoted_version(tmp_path: Path) -> None:
    ledger = RolloutLedger(tmp_path / "rollout.json", leader=True)
    versions = {v: _files(v) for v in (3, 4, 5)}
    assert ledger.starting_version("cnn", versions).version == 5  # nothing decided: newest
    ledger.record("cnn", versions[5], "rolled_back")
    assert ledger.starting_version("cnn", versions).version == 4  # never a rolled-back one
    ledger.record("cnn", versions[3], "promoted")
    assert ledger.starting_version("cnn", versions).version == 3  # 4 is still a canary
    ledger.record("cnn", versions[4], "promoted")
    assert ledger.starting_version("cnn", versions).version == 4


def test_an_unreadable_ledger_decides_nothing(tmp_path: Path) -> None:
    path = tmp_path / "rollout.json"
    path.write_text("{not json")
    assert RolloutLedger(path, leader=False).outcome("cnn", _files(3)) is None
