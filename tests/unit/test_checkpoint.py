from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pollinate.errors import CheckpointError
from pollinate.rundir.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint


def _ckpt(rnd: int) -> Checkpoint:
    rng = np.random.default_rng(rnd)
    return Checkpoint(
        server_round=rnd,
        model={"w": rng.normal(size=(3, 4)).astype(np.float32)},
        strategy={"0/m_t/w": rng.normal(size=(3, 4))},
        state={"history": [{"server_round": rnd}]},
    )


def test_round_trip_keeps_arrays_dtypes_and_state(tmp_path: Path) -> None:
    ckpt = _ckpt(1)
    save_checkpoint(tmp_path, ckpt)
    got = latest_checkpoint(tmp_path)
    assert got is not None
    assert got.server_round == 1
    np.testing.assert_array_equal(got.model["w"], ckpt.model["w"])
    assert got.model["w"].dtype == np.float32
    np.testing.assert_array_equal(got.strategy["0/m_t/w"], ckpt.strategy["0/m_t/w"])
    assert got.state["history"] == [{"server_round": 1}]


def test_latest_wins_and_old_rounds_are_pruned(tmp_path: Path) -> None:
    for rnd in range(1, 6):
        save_checkpoint(tmp_path, _ckpt(rnd), keep=2)
    got = latest_checkpoint(tmp_path)
    assert got is not None and got.server_round == 5
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["round-0004", "round-0005"]


@pytest.mark.parametrize(
    "step",
    [
        "rename",  # the checkpoint folder's move into place (atomic_dir)
        "replace",  # the LATEST pointer's (atomic_write_text)
    ],
)
def test_a_crash_while_writing_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    save_checkpoint(tmp_path, _ckpt(1))

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, step, boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _ckpt(2))
    monkeypatch.undo()
    got = latest_checkpoint(tmp_path)
    assert got is not None and got.server_round == 1
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_rewriting_a_round_replaces_its_folder(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _ckpt(1))
    again = _ckpt(1)
    again.model["w"] = again.model["w"] + 1
    again.state["extra"] = True
    folder = save_checkpoint(tmp_path, again)
    got = latest_checkpoint(tmp_path)
    assert got is not None and got.state["extra"] is True
    np.testing.assert_array_equal(got.model["w"], again.model["w"])
    assert sorted(p.name for p in folder.parent.iterdir()) == ["round-0001"]
    assert (tmp_path / "LATEST").read_text() == "checkpoints/round-0001\n"


def test_no_checkpoint_yet_and_missing_directory(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        latest_checkpoint(tmp_path / "nope")


def test_a_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path, _ckpt(1))
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        latest_checkpoint(tmp_path)
