"""Ed25519 signing keys: making a key pair, and signing a bundle's manifest with one.

The key pair is two PEM files: the PKCS#8 private key (mode 0600, created whole and never
over an existing file) and the SPKI public key devices trust. ``cryptography`` is imported
lazily; it is needed only when a bundle is signed or a key pair is made.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_bytes, create_private
from pollinate.export._errors import DestinationExistsError, SigningKeyError

__all__ = ["generate_signing_key", "sign_manifest"]


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
    create_private(private_path, private_pem)  # FileExistsError if it appeared meanwhile
    try:
        atomic_write_bytes(public_path, public_pem)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
