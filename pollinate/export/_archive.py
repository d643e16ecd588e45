"""The reproducible ``.tar.gz`` of a bundle directory.

The same files always give the same archive bytes: members sorted by path, zero timestamps,
no owner names or ids, ``0755`` folders and ``0644`` files, and a gzip header without a name
or time. :func:`~pollinate.export._bundle.write_bundle` streams it into a temporary file from
:func:`pollinate._atomic.atomic_file` and publishes it next to the bundle directory.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

__all__ = ["archive_path", "write_archive"]


def archive_path(out_dir: Path) -> Path:
    """Where :func:`~pollinate.export._bundle.write_bundle` puts the archive of ``out_dir``:
    ``<out_dir>.tar.gz`` next to the folder.

    The suffix is appended (not substituted), so ``mnist-1.2`` gives ``mnist-1.2.tar.gz``.
    """
    return out_dir.parent / f"{out_dir.name}.tar.gz"


def write_archive(root: Path, target: Path, top: str) -> None:
    """Pack the folder ``root`` as ``<top>/...`` into the file ``target`` (overwritten).

    ``target`` is written, not published: flushing it to disk and renaming it into place is
    the caller's part (see :func:`pollinate._atomic.atomic_file`).
    """
    with (
        Path(target).open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        entries = sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix())
        for path in [root, *entries]:
            rel = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), arcname=top if rel == "." else f"{top}/{rel}")
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isfile():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
