"""Ed25519 signatures over ``manifest.json``.

``cryptography`` is imported here, lazily, and only when a signature is actually checked: a
device that loads unsigned bundles never needs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pollinate.edge_runtime.errors import BundleError, RuntimeMissingError
from pollinate.edge_runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME

__all__ = ["SIGNATURE_BYTES", "load_public_key", "verify_manifest_signature"]

SIGNATURE_BYTES = 64
_PEM_PREFIX = "-----BEGIN"


def _serialization() -> Any:
    """``cryptography.hazmat.primitives.serialization``, or a clear install hint."""
    try:
        return importlib.import_module("cryptography.hazmat.primitives.serialization")
    except ImportError as err:
        raise RuntimeMissingError(
            "checking a bundle signature needs the 'cryptography' package, which is not "
            'installed: pip install "cryptography>=42"'
        ) from err


def load_public_key(public_key: str | Path) -> Any:
    """An Ed25519 public key from a PEM file path or from PEM text.

    Raises :class:`BundleError` when the file is missing or is not an Ed25519 public key.
    """
    serialization = _serialization()
    ed25519 = importlib.import_module("cryptography.hazmat.primitives.asymmetric.ed25519")
    if isinstance(public_key, str) and public_key.lstrip().startswith(_PEM_PREFIX):
        pem, where = public_key.encode("ascii", "replace"), "the given PEM text"
    else:
        path = Path(public_key)
        try:
            pem, where = path.read_bytes(), str(path)
        except OSError as err:
            raise BundleError(f"public key {path} cannot be read ({err.strerror})") from err
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as err:
        raise BundleError(
            f"public key from {where} is not a PEM public key (expected the public half of "
            "the export signing key, a file starting with '-----BEGIN PUBLIC KEY-----')"
        ) from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(
            f"public key from {where} is a {type(key).__name__}, not an Ed25519 public key"
        )
    return key


def verify_manifest_signature(
    bundle_dir: Path, manifest_bytes: bytes, public_key: str | Path
) -> None:
    """Check ``manifest.sig`` in ``bundle_dir`` against ``manifest_bytes`` and ``public_key``.

    Raises :class:`BundleError` when the signature file is missing, has the wrong length, or
    does not verify (the manifest was modified, or was signed with another key).
    """
    key = load_public_key(public_key)
    sig_path = bundle_dir / SIGNATURE_NAME
    try:
        signature = sig_path.read_bytes()
    except FileNotFoundError as err:
        raise BundleError(
            f"the bundle has no {SIGNATURE_NAME}, but a public key was given: the bundle is "
            "unsigned (sign it at export with a private key, or load it without public_key)"
        ) from err
    if len(signature) != SIGNATURE_BYTES:
        raise BundleError(
            f"{SIGNATURE_NAME} is {len(signature)} bytes, an Ed25519 signature is "
            f"{SIGNATURE_BYTES}: the signature file is corrupt"
        )
    exceptions = importlib.import_module("cryptography.exceptions")
    try:
        key.verify(signature, manifest_bytes)
    except exceptions.InvalidSignature as err:
        raise BundleError(
            f"{SIGNATURE_NAME} does not verify {MANIFEST_NAME} with the given public key: the "
            "manifest was modified after signing, or it was signed with another key"
        ) from err
