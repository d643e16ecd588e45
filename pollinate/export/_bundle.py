"""Writing bundles: files + manifest (+ signature) as a directory and a ``.tar.gz``.

A bundle appears whole or not at all: it is assembled in a hidden temporary directory next
to its destination, then renamed into place; the archive goes through a temporary file and
a rename too. The hashes in the manifest are computed from the copied files, so they cover
exactly the bytes that ship.

Also here: the Ed25519 signing key pair, and a Triton model-repository entry for the serving
tier (``config.pbtxt`` + ``<version>/model.onnx``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pollinate._atomic import atomic_write_bytes, atomic_write_text
from pollinate.edge_runtime.errors import BundleError
from pollinate.edge_runtime.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    TensorSpec,
    sha256_file,
)
from pollinate.errors import ExportError

__all__ = [
    "DestinationExistsError",
    "SigningKeyError",
    "SourceMissingError",
    "archive_path",
    "generate_signing_key",
    "next_triton_version",
    "sign_manifest",
    "triton_config",
    "write_bundle",
    "write_triton_entry",
]

_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


class DestinationExistsError(ExportError, FileExistsError):
    """A bundle directory or key file would overwrite something that exists."""


class SourceMissingError(ExportError, FileNotFoundError):
    """A file to put into the bundle does not exist."""


class SigningKeyError(ExportError, ValueError):
    """A signing key cannot be read, is encrypted, or is not Ed25519."""


def archive_path(out_dir: Path) -> Path:
    """Where :func:`write_bundle` puts the archive: ``<out_dir>.tar.gz`` next to the folder.

    The suffix is appended (not substituted), so ``mnist-1.2`` gives ``mnist-1.2.tar.gz``.
    """
    return out_dir.parent / f"{out_dir.name}.tar.gz"


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


def _copy_synced(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    os.chmod(target, 0o644)


def _write_synced(target: Path, data: bytes) -> None:
    with target.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(target, 0o644)


def _load_private_key(private_key: Path) -> Any:
    serialization = importlib.import_module("cryptography.hazmat.primitives.serialization")
    ed25519 = importlib.import_module("cryptography.hazmat.primitives.asymmetric.ed25519")
    try:
        pem = Path(private_key).read_bytes()
    except OSError as err:
        raise SigningKeyError(f"signing key {private_key} cannot be read ({err.strerror})") from err
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise SigningKeyError(
            f"signing key {private_key} is not an unencrypted PEM private key ({err}); "
            "create one with generate_signing_key()"
        ) from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {private_key} is {type(key).__name__}, not Ed25519")
    return key


def sign_manifest(manifest_bytes: bytes, private_key: Path) -> bytes:
    """The raw 64-byte Ed25519 signature of ``manifest_bytes`` with a PEM private key file."""
    signature: bytes = _load_private_key(private_key).sign(manifest_bytes)
    return signature


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


def _write_archive(root: Path, archive: Path, top: str) -> Path:
    """Pack ``root`` as ``<top>/...`` into a temporary file next to ``archive``; return it.

    The archive is reproducible: sorted members, zero timestamps, no owner names.
    """
    fd, tmp_name = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
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
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


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
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DestinationExistsError(
            f"bundle destination {out_dir} already exists and is not an empty directory; "
            "choose a new directory (e.g. one per model version) or remove the old bundle"
        )
    names = sorted(_check_name(name) for name in files)
    for name in names:
        if not Path(files[name]).is_file():
            raise SourceMissingError(f"source of bundle file {name} not found: {files[name]}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    archive = archive_path(out_dir)
    tmp_archive: Path | None = None
    placed = False
    try:
        for name in names:
            _copy_synced(Path(files[name]), tmp / name)
        final = _fill_hashes(manifest, tmp, names)
        manifest_bytes = final.to_json().encode("utf-8")
        try:  # what the edge runtime will read must parse there
            Manifest.from_json(manifest_bytes.decode("utf-8"))
        except BundleError as err:
            raise ValueError(f"the manifest would not load on a device: {err}") from err
        _write_synced(tmp / MANIFEST_NAME, manifest_bytes)
        if private_key is not None:
            _write_synced(tmp / SIGNATURE_NAME, sign_manifest(manifest_bytes, private_key))
        for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o755)
        if make_tar:
            tmp_archive = _write_archive(tmp, archive, out_dir.name)
        try:
            os.rename(tmp, out_dir)  # onto a missing or empty directory only
        except OSError as err:
            raise DestinationExistsError(
                f"bundle destination {out_dir} appeared while the bundle was written "
                f"({err.strerror}); nothing was changed"
            ) from err
        placed = True
        if tmp_archive is not None:
            os.replace(tmp_archive, archive)
            tmp_archive = None
        _fsync_dir(out_dir.parent)
    except BaseException:
        if placed:
            with contextlib.suppress(OSError):
                os.rename(out_dir, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp_archive is not None:
            tmp_archive.unlink(missing_ok=True)
        raise
    return out_dir


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def generate_signing_key(private_path: Path, public_path: Path) -> None:
    """Create an Ed25519 key pair as PEM files: PKCS#8 private (mode 0600), SPKI public.

    Existing files are never overwritten (``FileExistsError``): replacing a signing key would
    silently invalidate every device's trust in the old one.
    """
    ed25519 = importlib.import_module("cryptography.hazmat.primitives.asymmetric.ed25519")
    serialization = importlib.import_module("cryptography.hazmat.primitives.serialization")
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise DestinationExistsError(f"{path} already exists; refusing to overwrite a key file")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(private_path, 0o600)  # in case the umask or platform widened it
        atomic_write_bytes(public_path, public_pem)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise


def _triton_tensor(spec: TensorSpec) -> str:
    if spec.dtype not in _TRITON_TYPES:
        raise ValueError(
            f"tensor {spec.name!r} has dtype {spec.dtype!r}, which has no Triton type here "
            f"(supported: {', '.join(_TRITON_TYPES)})"
        )
    dims = ", ".join(str(int(d)) for d in spec.shape[1:])
    return (
        "  {\n"
        f'    name: "{spec.name}"\n'
        f"    data_type: {_TRITON_TYPES[spec.dtype]}\n"
        f"    dims: [ {dims} ]\n"
        "  }"
    )


def triton_config(model_name: str, manifest: Manifest, *, max_batch_size: int = 256) -> str:
    """The ``config.pbtxt`` text of an ONNX Runtime model with dynamic batching."""
    inputs = ",\n".join(_triton_tensor(spec) for spec in manifest.inputs)
    outputs = ",\n".join(_triton_tensor(spec) for spec in manifest.outputs)
    return (
        f'name: "{model_name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching { }\n"
    )


def next_triton_version(repo: Path, model_name: str, server_round: int) -> int:
    """The version a new export publishes: the checkpoint's round, or, when the repository
    already holds that version or a later one (an earlier run), one past the newest, so a
    retrained model is always newer than what is served and never overwrites it."""
    model_dir = Path(repo) / model_name
    newest = 0
    if model_dir.is_dir():
        taken = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        newest = max(taken, default=0)
    return server_round if server_round > newest else newest + 1


def write_triton_entry(
    repo: Path,
    model_name: str,
    version: int,
    onnx_file: Path,
    manifest: Manifest,
    *,
    max_batch_size: int = 256,
    torch_weights: Mapping[str, Any] | None = None,
    torch_spec: Mapping[str, Any] | None = None,
) -> Path:
    """Add ``repo/<model_name>/config.pbtxt`` and ``repo/<model_name>/<version>/model.onnx``.

    The layout Triton (and pollinate's serving tier) reads; the batch dimension is left out
    of ``dims`` because ``max_batch_size`` > 0. Beside ``model.onnx`` go the bundle's
    ``manifest.json`` (the serving tier's drift reference) and, given ``torch_weights``
    (a state dict of tensors) and ``torch_spec`` (``architecture``, ``input_shape``,
    ``num_classes``), ``model.safetensors`` + ``torch.json`` for the torch backend; Triton
    ignores them. Each file is written atomically, ``model.onnx`` last, so a watcher that
    sees the model file sees the rest. Returns the model's directory.
    """
    if not model_name or "/" in model_name or "\\" in model_name or model_name in (".", ".."):
        raise ValueError(f"model_name must be a plain directory name, got {model_name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer (Triton's rule), got {version!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    for spec in (*manifest.inputs, *manifest.outputs):
        if not spec.shape or int(spec.shape[0]) != -1:
            raise ValueError(
                f"tensor {spec.name!r} has shape {spec.shape}; batching needs a dynamic "
                "first dimension (-1)"
            )
    config = triton_config(model_name, manifest, max_batch_size=max_batch_size)
    model_dir = Path(repo) / model_name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(version_dir / "manifest.json", manifest.to_json())
    if torch_weights is not None and torch_spec is not None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in torch_weights.items()}
        atomic_write_bytes(version_dir / "model.safetensors", save(tensors))
        atomic_write_text(version_dir / "torch.json", json.dumps(dict(torch_spec), indent=2) + "\n")
    atomic_write_text(model_dir / "config.pbtxt", config)
    target = version_dir / "model.onnx"
    fd, tmp_name = tempfile.mkstemp(dir=version_dir, prefix=".model.onnx.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as dst, Path(onnx_file).open("rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return model_dir
