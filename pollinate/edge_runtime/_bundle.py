"""Opening a bundle: safe extraction of ``.tar.gz``, signature and hash checks, artifact choice.

A bundle is a directory (or the same directory packed as ``<name>.tar.gz``) holding
``manifest.json``, optionally ``manifest.sig``, and every file the manifest lists. A bundle is
accepted only when every listed file is present with its sha256, no unlisted file is present,
and (when a public key is given) the signature verifies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from pollinate.edge_runtime._backends import PREFERENCE, RUNTIME_INFO, runtime_installed
from pollinate.edge_runtime.errors import BundleError, RuntimeMissingError
from pollinate.edge_runtime.manifest import (
    MANIFEST_NAME,
    PRECISIONS,
    SIGNATURE_NAME,
    Artifact,
    Manifest,
    sha256_file,
)

__all__ = [
    "AUTO_PRECISION_ORDER",
    "MAX_ARCHIVE_BYTES",
    "VerifiedBundle",
    "extract_archive",
    "open_bundle",
    "select_artifact",
    "verify_bundle",
    "verify_bundle_dir",
]

AUTO_PRECISION_ORDER = ("int8", "fp16", "fp32")
MAX_ARCHIVE_BYTES = 16 << 30  # refuse archives that would unpack to more (a gzip bomb)
_SPECIAL = (MANIFEST_NAME, SIGNATURE_NAME)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle directory whose files all matched the manifest."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature_verified: bool


# ---------------------------------------------------------------------- archives
def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if not name or "\x00" in name:
        return "has an empty or invalid name"
    if name.startswith(("/", "\\")) or PureWindowsPath(name).is_absolute() or ":" in name:
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "contains '..'"
    if member.issym() or member.islnk():
        return f"is a link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "is a device, FIFO or other special file"
    return None


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a bundle archive into ``dest`` (an empty, private directory); return its root.

    Every member is checked before anything is written: absolute paths, ``..``, links,
    devices, FIFOs and duplicated names are refused with :class:`BundleError`. The root is
    ``dest`` when ``manifest.json`` is at the top of the archive, or the archive's single
    top-level directory when it holds ``manifest.json``.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            seen: set[str] = set()
            total = 0
            for member in members:
                reason = _unsafe_reason(member)
                if reason is not None:
                    raise BundleError(
                        f"bundle archive {archive.name}: member {member.name!r} {reason}; "
                        "refusing to extract it"
                    )
                key = PurePosixPath(member.name).as_posix().rstrip("/")
                if member.isfile() and key in seen:
                    raise BundleError(
                        f"bundle archive {archive.name}: member {member.name!r} appears twice"
                    )
                seen.add(key)
                total += member.size
            if total > MAX_ARCHIVE_BYTES:
                raise BundleError(
                    f"bundle archive {archive.name} would unpack to {total} bytes, more than "
                    f"the {MAX_ARCHIVE_BYTES} this runtime accepts"
                )
            for member in members:
                target = dest.joinpath(*PurePosixPath(member.name).parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have data
                    raise BundleError(f"bundle archive {archive.name}: cannot read {member.name}")
                with source, target.open("wb") as handle:
                    shutil.copyfileobj(source, handle, 1 << 20)
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise BundleError(
            f"bundle archive {archive} cannot be read ({type(err).__name__}: {err}): it is "
            "corrupt, truncated or not a .tar.gz"
        ) from err
    if (dest / MANIFEST_NAME).is_file():
        return dest
    tops = list(dest.iterdir())
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / MANIFEST_NAME).is_file():
        return tops[0]
    raise BundleError(f"bundle archive {archive.name} has no {MANIFEST_NAME} at its top level")


# ---------------------------------------------------------------------- verification
def _walk(root: Path) -> list[str]:
    """Every non-directory entry under ``root`` (links included, never followed), posix."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        base = Path(folder)
        links = [d for d in dirs if (base / d).is_symlink()]
        for name in [*files, *links]:
            found.append((base / name).relative_to(root).as_posix())
    return sorted(found)


def verify_bundle_dir(root: Path, *, public_key: str | Path | None = None) -> VerifiedBundle:
    """Check a bundle directory: signature (when ``public_key``), manifest, every file's hash.

    Raises :class:`BundleError` naming the first problem found.
    """
    manifest_path = root / MANIFEST_NAME
    try:
        manifest_bytes = manifest_path.read_bytes()
    except FileNotFoundError as err:
        raise BundleError(f"{root} is not a bundle: it has no {MANIFEST_NAME}") from err
    except OSError as err:
        raise BundleError(f"{manifest_path} cannot be read ({err.strerror})") from err
    signed = False
    if public_key is not None:
        from pollinate.edge_runtime._signing import verify_manifest_signature

        verify_manifest_signature(root, manifest_bytes, public_key)
        signed = True
    try:
        text = manifest_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BundleError(f"{MANIFEST_NAME} is not UTF-8 text: it is corrupt") from err
    manifest = Manifest.from_json(text)
    if not manifest.inputs or not manifest.outputs or not manifest.artifacts:
        raise BundleError(f"{MANIFEST_NAME} lists no inputs, outputs or artifacts")
    sizes = {art.file: art.size_bytes for art in manifest.artifacts}
    listed = manifest.listed_files()
    for name, digest in listed.items():
        path = root.joinpath(*PurePosixPath(name).parts)
        if path.is_symlink():
            raise BundleError(f"bundle file {name} is a symbolic link; bundles hold plain files")
        if not path.is_file():
            raise BundleError(f"bundle file {name} listed in {MANIFEST_NAME} is missing")
        if not digest:
            raise BundleError(f"{MANIFEST_NAME} lists {name} without a sha256")
        size = path.stat().st_size
        if name in sizes and size != sizes[name]:
            raise BundleError(
                f"bundle file {name} is {size} bytes, {MANIFEST_NAME} says {sizes[name]}: "
                "it was tampered with or truncated"
            )
        actual = sha256_file(path)
        if actual != digest.lower():
            raise BundleError(
                f"bundle file {name} does not match its sha256 in {MANIFEST_NAME} (expected "
                f"{digest[:16]}..., got {actual[:16]}...): it was tampered with or truncated"
            )
    for rel in _walk(root):
        if rel not in _SPECIAL and rel not in listed:
            raise BundleError(
                f"bundle file {rel} is not listed in {MANIFEST_NAME}, so no sha256 covers it; "
                "remove it or re-export the bundle"
            )
    return VerifiedBundle(root, manifest, manifest_bytes, signed)


@contextlib.contextmanager
def open_bundle(path: str | Path) -> Iterator[tuple[Path, Path | None]]:
    """Yield ``(bundle root, temp dir or None)`` for a bundle directory or archive.

    An archive is extracted into a private temporary directory; on error the directory is
    removed. On success the caller owns the temporary directory (and must remove it).
    """
    path = Path(path)
    if path.is_dir():
        yield path, None
        return
    if not path.is_file():
        raise BundleError(f"no bundle at {path} (expected a bundle directory or a .tar.gz)")
    tmp = Path(tempfile.mkdtemp(prefix="pollinate-bundle-"))
    try:
        yield extract_archive(path, tmp), tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_bundle(path: str | Path, *, public_key: str | Path | None = None) -> Manifest:
    """Verify a bundle directory or archive without loading any runtime; return its manifest.

    Raises :class:`BundleError` when anything does not match (see :func:`verify_bundle_dir`).
    """
    with open_bundle(path) as (root, tmp):
        try:
            return verify_bundle_dir(root, public_key=public_key).manifest
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- artifact choice
def _describe(artifacts: list[Artifact]) -> str:
    return ", ".join(f"{a.runtime} {a.precision} ({a.file})" for a in artifacts) or "none"


def _by_precision(artifacts: list[Artifact], precision: str) -> Artifact | None:
    order = AUTO_PRECISION_ORDER if precision == "auto" else (precision,)
    for wanted in order:
        for art in artifacts:
            if art.precision == wanted:
                return art
    return None


def select_artifact(manifest: Manifest, backend: str, precision: str) -> Artifact:
    """Pick the artifact to run.

    ``backend="auto"``: the first installed runtime (onnxruntime > openvino > litert) among
    the bundle's artifacts that has the requested precision. ``precision="auto"``: int8 if
    present, else fp16, else fp32. A requested runtime that is not installed is a
    :class:`RuntimeMissingError` with the pip command; an artifact the bundle lacks is a
    :class:`BundleError` listing what it has.
    """
    if backend != "auto" and backend not in RUNTIME_INFO:
        raise ValueError(
            f"backend must be 'auto' or one of {', '.join(PREFERENCE)}, got {backend!r}"
        )
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(
            f"precision must be 'auto' or one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    have = manifest.artifacts
    if backend == "auto":
        candidates = [
            r
            for r in PREFERENCE
            if _by_precision([a for a in have if a.runtime == r], precision) is not None
        ]
        if not candidates:
            raise BundleError(f"the bundle has no {precision} artifact; it has: {_describe(have)}")
        installed = [r for r in candidates if runtime_installed(r)]
        if not installed:
            hints = "; ".join(f"{r}: {RUNTIME_INFO[r].install_hint}" for r in candidates)
            raise RuntimeMissingError(
                f"none of the runtimes this bundle's artifacts need is installed ({hints})"
            )
        runtime = installed[0]
    else:
        runtime = backend
        mine = [a for a in have if a.runtime == runtime]
        if not runtime_installed(runtime):
            info = RUNTIME_INFO[runtime]
            note = "" if mine else f" (note: this bundle has no {runtime} artifact either)"
            raise RuntimeMissingError(
                f"backend {runtime!r} needs {info.package}, which is not installed; install it "
                f"with: {info.install_hint}{note}"
            )
        if not mine:
            raise BundleError(f"the bundle has no {runtime} artifact; it has: {_describe(have)}")
    chosen = _by_precision([a for a in have if a.runtime == runtime], precision)
    if chosen is None:
        raise BundleError(
            f"the bundle has no {runtime} {precision} artifact; it has: {_describe(have)}"
        )
    return chosen
