"""Durable writes: a crash at any point leaves the old file or folder whole, and no debris."""

from __future__ import annotations

import os
import stat
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from pollinate import _atomic
from pollinate._atomic import (
    append_lines,
    atomic_dir,
    atomic_file,
    atomic_write_text,
    create_private,
)


class CrashError(Exception):
    """Stands in for a crash (power loss, SIGKILL) at the worst moment."""


def _crash(*_: object, **__: object) -> None:
    raise CrashError


def _write_and_crash(context: AbstractContextManager[Path], name: str) -> None:
    with context as tmp:
        (tmp / name if name else tmp).write_bytes(b"half")
        raise CrashError


def test_a_crash_before_the_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "old\n")
    monkeypatch.setattr(_atomic.os, "replace", _crash)
    with pytest.raises(CrashError):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_modes_and_missing_parents(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a" / "b" / "plain.txt", "x")
    atomic_write_text(tmp_path / "secret", "s", mode=0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b" / "plain.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "secret").st_mode) == 0o600


def test_a_private_file_is_never_replaced(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    create_private(key, b"first")
    with pytest.raises(FileExistsError):
        create_private(key, b"second")
    assert key.read_bytes() == b"first"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_atomic_file_publishes_only_a_finished_file(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"graph")
        assert not target.exists()
    assert target.read_bytes() == b"graph"
    with pytest.raises(CrashError):
        _write_and_crash(atomic_file(target), "")
    assert target.read_bytes() == b"graph"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "round-0001"
    with pytest.raises(CrashError):
        _write_and_crash(atomic_dir(final), "model.safetensors")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"v1")
    assert (final / "model.safetensors").read_bytes() == b"v1"
    # without replace, an existing folder with files is never overwritten
    with pytest.raises(OSError, match="not empty"), atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"v2")
    assert (final / "model.safetensors").read_bytes() == b"v1"
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"v2")
    assert (final / "model.safetensors").read_bytes() == b"v2"
    assert [p.name for p in tmp_path.iterdir()] == ["round-0001"]


def test_a_crash_in_the_swap_keeps_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "bundle"
    with atomic_dir(final) as tmp:
        (tmp / "manifest.json").write_text("{}")
    monkeypatch.setattr(_atomic, "fsync_tree", _crash)  # fails after the files, before a rename
    with pytest.raises(CrashError), atomic_dir(final, replace=True) as tmp:
        (tmp / "manifest.json").write_text('{"new": true}')
    assert (final / "manifest.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_append_lines_adds_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "journal.jsonl"
    append_lines(log, ['{"a": 1}', '{"b": 2}\n'])
    append_lines(log, [])
    append_lines(log, ['{"c": 3}'])
    assert log.read_text().splitlines() == ['{"a": 1}', '{"b": 2}', '{"c": 3}']
