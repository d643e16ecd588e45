"""The device's bundle store: model bundles the server delivers, verified and installed
atomically, the previous one kept for rollback.

Layout under the daemon's state directory::

    bundles/
      current.json             {"current": NAME, "previous": NAME | null, ...}, replaced
                               atomically: the one switch between bundles
      mnist-cnn-3-1f2e3d4c5b6a/ an installed bundle (verified, never modified)
      mnist-cnn-2-9a8b7c6d5e4f/ the previous one, for `pollinate edge rollback`

An install checks the archive's sha256 against the one the server sent, extracts it member by
member (the edge runtime refuses links, ``..`` and absolute paths), verifies every file
against the manifest and, when the device has the exporter's public key, the manifest's
ed25519 signature, all inside a hidden ``.incoming-*`` folder. Only then is the folder
renamed into place and ``current.json`` replaced. A refused bundle changes nothing: the
installed one keeps serving. Older bundles beyond current and previous are removed.

This module imports the edge runtime only (no torch, no flwr): the daemon uses it too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_text, fsync_dir, fsync_tree
from pollinate.edge_runtime import BundleError
from pollinate.edge_runtime._bundle import extract_archive, verify_bundle_dir

__all__ = ["BundleStore", "InstalledBundle"]

POINTER = "current.json"


@dataclass(frozen=True)
class InstalledBundle:
    """One installed bundle: its folder name, where it is, what it holds."""

    name: str
    path: Path
    model: str
    version: str
    sha256: str
    signed: bool


class BundleStore:
    """Install, look up and roll back the bundles in ``STATE_DIR/bundles``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "bundles"

    # ------------------------------------------------------------------ lookup
    def pointer(self) -> dict[str, Any]:
        """``current.json`` (empty when nothing was installed)."""
        path = self.root / POINTER
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise BundleError(f"{path} is unreadable ({err}); reinstall a bundle") from err
        return data if isinstance(data, dict) else {}

    def current(self) -> Path | None:
        """The folder of the bundle in service, or None."""
        name = self.pointer().get("current")
        return self.root / name if isinstance(name, str) and name else None

    def describe(self) -> dict[str, Any] | None:
        """What is in service, for `pollinate edge status`: name, model, version, installed."""
        pointer = self.pointer()
        folder = self.current()
        if folder is None:
            return None
        info: dict[str, Any] = {
            "name": folder.name,
            "installed": pointer.get("installed"),
            "previous": pointer.get("previous"),
            "signed": pointer.get("signed"),
        }
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            info["model"] = manifest["model"]["name"]
            info["version"] = manifest["model"]["version"]
        except (OSError, ValueError, KeyError, TypeError):
            info["model"] = info["version"] = None
        return info

    # ------------------------------------------------------------------ install
    def install(
        self, archive: bytes, *, sha256: str, public_key: Path | None = None
    ) -> InstalledBundle:
        """Verify ``archive`` (a bundle .tar.gz) and make it the bundle in service.

        Raises :class:`BundleError` saying what is wrong; nothing changes then.
        """
        actual = hashlib.sha256(archive).hexdigest()
        if actual != sha256.lower():
            raise BundleError(
                f"the delivered bundle does not match the sha256 the server sent (expected "
                f"{sha256[:16]}..., got {actual[:16]}...): it was corrupted on the way; "
                "the installed bundle stays in service"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(dir=self.root, prefix=".incoming-"))
        try:
            (incoming / "bundle.tar.gz").write_bytes(archive)
            (incoming / "x").mkdir()
            top = extract_archive(incoming / "bundle.tar.gz", incoming / "x")
            verified = verify_bundle_dir(top, public_key=public_key)
            model = verified.manifest.model
            name = _safe(f"{model.name}-{model.version}-{actual[:12]}")
            target = self.root / name
            if not target.exists():
                fsync_tree(top)
                top.rename(target)
                fsync_dir(self.root)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        pointer = self.pointer()
        previous = pointer.get("current")
        self._point(
            current=name,
            previous=previous if previous != name else pointer.get("previous"),
            signed=verified.signature_verified,
        )
        self._prune()
        return InstalledBundle(
            name, target, model.name, str(model.version), actual, verified.signature_verified
        )

    def rollback(self) -> str:
        """Put the previous bundle back in service; returns its name."""
        pointer = self.pointer()
        previous = pointer.get("previous")
        if not isinstance(previous, str) or not (self.root / previous).is_dir():
            raise BundleError(f"no previous bundle to roll back to in {self.root}")
        self._point(current=previous, previous=pointer.get("current"), signed=None)
        return previous

    def _point(self, **fields: Any) -> None:
        fields["installed"] = dt.datetime.now(dt.UTC).isoformat()
        atomic_write_text(self.root / POINTER, json.dumps(fields, indent=2) + "\n")

    def _prune(self) -> None:
        pointer = self.pointer()
        keep = {pointer.get("current"), pointer.get("previous")}
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)


def _safe(name: str) -> str:
    """A folder name from model name and version: letters, digits, ``-``, ``_``, ``.``."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-")
    return cleaned or "bundle"
