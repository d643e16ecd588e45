"""Writing bundles: files + manifest (+ signature) as a directory and a ``.tar.gz``.

A bundle appears whole or not at all: it is assembled in a hidden temporary directory next
to its destination (:func:`pollinate._atomic.atomic_dir`), then renamed into place; the
archive goes through a temporary file and a rename too (:func:`pollinate._atomic.atomic_file`),
right after the directory. The hashes in the manifest are computed from the copied files, so
they cover exactly the bytes that ship.

The archive format lives in :mod:`pollinate.export._archive`, the signing keys in
:mod:`pollinate.export._signing`, the Triton repository entry in
:mod:`pollinate.export._triton`; the names a bundle writer's caller needs are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

from pollinate._atomic import atomic_dir, atomic_file, discard_dir
from pollinate.edge_runtime.errors import BundleError
from pollinate.edge_runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, sha256_file
from pollinate.export._archive import archive_path, write_archive
from pollinate.export._errors import DestinationExistsError, SigningKeyError, SourceMissingError
from pollinate.export._signing import generate_signing_key, sign_manifest

__all__ = [
    "DestinationExistsError",
    "SigningKeyError",
    "SourceMissingError",
    "archive_path",
    "generate_signing_key",
    "write_bundle",
]


def _check_name(name: str) -> str:
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or ":" in name
        or path.is_absolute()
        or ".." in path.parts
        or path.as_posix() != name
    ):
        raise ValueError(
            f"bundle file name {name!r} must be a plain relative path with '/' separators, "
            "like 'model.fp32.onnx' or 'openvino/model.fp16.xml'"
        )
    if name in (MANIFEST_NAME, SIGNATURE_NAME):
        raise ValueError(f"{name} is written by write_bundle itself; do not pass it in files")
    return name


def _copy(source: Path, target: Path) -> None:
    """Copy one file into the staged bundle (fsynced with the whole folder when it is placed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    os.chmod(target, 0o644)


def _write(target: Path, data: bytes) -> None:
    """Write one file of the staged bundle (fsynced with the whole folder when it is placed)."""
    target.write_bytes(data)
    os.chmod(target, 0o644)


def _fill_hashes(manifest: Manifest, root: Path, names: list[str]) -> Manifest:
    """The manifest with size and sha256 of every copied file; unowned files go to ``files``."""
    digests = {name: sha256_file(root / name) for name in names}
    owned: set[str] = set()
    artifacts = []
    for art in manifest.artifacts:
        for name in (art.file, *art.extra_files):
            if name not in digests:
                raise ValueError(
                    f"artifact {art.file} names {name}, which is not among the files to write "
                    f"({', '.join(sorted(digests)) or 'none'})"
                )
            owned.add(name)
        artifacts.append(
            dataclasses.replace(
                art,
                size_bytes=(root / art.file).stat().st_size,
                sha256=digests[art.file],
                extra_files={name: digests[name] for name in art.extra_files},
            )
        )
    files = {name: digests[name] for name in names if name not in owned}
    return dataclasses.replace(manifest, artifacts=artifacts, files=files)


def _occupied(out_dir: Path) -> bool:
    """Whether ``out_dir`` exists as anything but an empty directory."""
    return out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))


def _stage(
    tmp: Path, manifest: Manifest, sources: Mapping[str, Path], private_key: Path | None
) -> None:
    """Fill the staged folder ``tmp``: the files, the hashed manifest and its signature."""
    names = list(sources)
    for name in names:
        _copy(sources[name], tmp / name)
    final = _fill_hashes(manifest, tmp, names)
    manifest_bytes = final.to_json().encode("utf-8")
    try:  # what the edge runtime will read must parse there
        Manifest.from_json(manifest_bytes.decode("utf-8"))
    except BundleError as err:
        raise ValueError(f"the manifest would not load on a device: {err}") from err
    _write(tmp / MANIFEST_NAME, manifest_bytes)
    if private_key is not None:
        _write(tmp / SIGNATURE_NAME, sign_manifest(manifest_bytes, private_key))
    for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        os.chmod(folder, 0o755)


@contextlib.contextmanager
def _staged_archive(archive: Path | None) -> Iterator[Path | None]:
    """:func:`~pollinate._atomic.atomic_file` of ``archive``, or nothing without an archive."""
    if archive is None:
        yield None
        return
    with atomic_file(archive) as staged:
        yield staged


def write_bundle(
    out_dir: Path,
    manifest: Manifest,
    files: Mapping[str, Path],
    *,
    private_key: Path | None = None,
    make_tar: bool = True,
) -> Path:
    """Write a bundle directory ``out_dir`` (and ``<out_dir>.tar.gz`` when ``make_tar``).

    ``files`` maps bundle-relative names (``'model.fp32.onnx'``, ``'openvino/model.xml'``) to
    source paths. Each artifact's ``size_bytes``/``sha256`` and its ``extra_files`` hashes are
    filled from the copied files; files no artifact names are listed in ``manifest.files``.
    With ``private_key`` (an Ed25519 PEM file) ``manifest.sig`` signs the exact bytes of
    ``manifest.json``. An existing, non-empty ``out_dir`` is refused
    (:class:`DestinationExistsError`); an existing archive of the same name is replaced. On any
    failure nothing is left behind.

    Raises :class:`DestinationExistsError`, :class:`SourceMissingError`,
    :class:`SigningKeyError` (all :class:`~pollinate.errors.ExportError`, and also
    ``FileExistsError`` / ``FileNotFoundError`` / ``ValueError``), or ``ValueError`` for a
    manifest that does not match ``files`` (an artifact naming a file not passed in).

    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if _occupied(out_dir):
        raise DestinationExistsError(
            f"bundle destination {out_dir} already exists and is not an empty directory; "
            "choose a new directory (e.g. one per model version) or remove the old bundle"
        )
    names = sorted(_check_name(name) for name in files)
    for name in names:
        if not Path(files[name]).is_file():
            raise SourceMissingError(f"source of bundle file {name} not found: {files[name]}")
    placed = False
    try:
        # The archive is packed from the staged folder and published right after the folder
        # is renamed into place (the inner block); a failure before that leaves the old one.
        with _staged_archive(archive_path(out_dir) if make_tar else None) as staged_archive:
            filled = False
            try:
                with atomic_dir(out_dir) as tmp:
                    _stage(tmp, manifest, {name: Path(files[name]) for name in names}, private_key)
                    if staged_archive is not None:
                        write_archive(tmp, staged_archive, out_dir.name)
                    filled = True
            except OSError as err:
                if filled and _occupied(out_dir):  # the rename onto a missing or empty dir
                    raise DestinationExistsError(
                        f"bundle destination {out_dir} appeared while the bundle was written "
                        f"({err.strerror}); nothing was changed"
                    ) from err
                raise
            placed = True
    except BaseException:
        if placed:  # the archive could not be published: take the folder away again
            with contextlib.suppress(OSError):
                discard_dir(out_dir)
        raise
    return out_dir
