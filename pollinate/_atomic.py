"""Durable writes: a reader sees the old file (or folder) or the new one, never a partial one.

Every file pollinate keeps (checkpoints, ledgers, reports, bundles, keys, state) is written
through this module:

* :func:`atomic_write_bytes` / :func:`atomic_write_text`: a temporary file in the same folder,
  flushed and fsynced, then :func:`os.replace`; the folder is fsynced afterwards.
* :func:`create_private`: a new owner-only file (mode 0600) that never replaces an existing one
  (keys, secrets).
* :func:`atomic_file`: a temporary path beside the destination for a writer that needs a file
  name (a library's ``save``, a copy, a tar stream); fsynced and renamed into place on success.
* :func:`atomic_dir`: build a folder under a temporary name, fsync its files, rename it into
  place (replacing an older folder of that name only when asked).
* :func:`discard_dir`: take a folder away whole (renamed aside, then removed).
* :func:`append_line` / :func:`append_lines`: fsynced lines at the end of an append-only log
  (JSON lines).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "append_line",
    "append_lines",
    "atomic_dir",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "create_private",
    "discard_dir",
    "fsync_dir",
    "fsync_tree",
]


def fsync_dir(folder: Path) -> None:
    """fsync a folder's entry list where the platform allows it (not on Windows)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below ``root`` (folders included where the platform allows it)."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(Path(root))


def _synced_temp(path: Path, data: bytes, mode: int) -> Path:
    """A temporary file beside ``path`` holding ``data``, fsynced, with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)  # mkstemp makes 0600; a result file is an ordinary file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return Path(tmp_name)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The temporary file is flushed and fsynced before :func:`os.replace`; the folder is fsynced
    afterwards where the platform allows it. Missing parent folders are created. ``mode`` is
    the new file's permission bits (``0o600`` for a secret).
    """
    path = Path(path)
    tmp = _synced_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    """UTF-8 text form of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def create_private(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600) with ``data``, whole or not at all; never replace a file.

    Raises :class:`FileExistsError` when ``path`` exists (a key is never overwritten).
    """
    path = Path(path)
    tmp = _synced_temp(path, data, 0o600)
    try:
        os.link(tmp, path)  # fails if path exists
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: Path, *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on a clean exit it becomes ``path``.

    For writers that need a file name rather than bytes (``onnx.save``, a copy, a tar stream):
    the yielded file exists (empty, mode 0600) and may be overwritten. On a clean exit it is
    fsynced, given ``mode``, renamed onto ``path`` with :func:`os.replace`, and the folder is
    fsynced. On an error it is removed and ``path`` is untouched. Missing parent folders are
    created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on a clean exit it is fsynced and renamed
    to ``final``. On an error it is removed and ``final`` is untouched.

    With ``replace`` an existing ``final`` is swapped out (renamed aside, then removed);
    without it an existing non-empty ``final`` makes the rename fail with :class:`OSError`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
        fsync_tree(tmp)
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old."))
            os.rmdir(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def discard_dir(folder: Path) -> None:
    """Remove ``folder`` so that a reader sees it whole or not at all.

    It is renamed aside to a hidden temporary name beside it first, then deleted; undoing an
    :func:`atomic_dir` that must not stay. A missing ``folder`` is not an error.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
    os.rmdir(aside)
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(folder.parent)


def append_lines(path: Path, lines: Iterable[str]) -> None:
    """Append lines (newlines are added) to an append-only log with one write and one fsync.

    A crash can lose at most the lines being written; readers of such logs skip a torn last
    line.
    """
    text = "".join(line.rstrip("\n") + "\n" for line in lines)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        log.write(text)
        log.flush()
        os.fsync(log.fileno())


def append_line(path: Path, line: str) -> None:
    """Append one line to an append-only log and fsync it (see :func:`append_lines`)."""
    append_lines(path, [line])
