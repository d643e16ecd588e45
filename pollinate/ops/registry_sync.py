"""The registry's ``production`` and ``staging`` versions, materialised as a serving repository.

:func:`sync_once` reads a registered model's aliases (:mod:`pollinate.rundir.model_registry`)
and writes each aliased version that the local Triton-layout repository lacks as
``REPO/NAME/<registry version>/`` (:func:`pollinate.export._triton.write_triton_entry`:
``config.pbtxt``, ``manifest.json``, ``model.onnx`` last): the bundle archive registered with
the version is downloaded, its sha256 checked against the version's ``pollinate.sha256`` tag,
and its FP32 ONNX model published. ``pollinate serve --repository REPO`` then serves the
newest version it has as current and takes a newer one as a canary; so ``production`` is
written first and ``staging`` only when it is newer than ``production``. The aliases then go
to ``REPO/NAME/registry.json`` (after the versions they name): a running server follows a
``production`` that moves to another version (a rollback) by swapping to it, no canary.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_text
from pollinate.edge_runtime.manifest import MANIFEST_NAME, Manifest
from pollinate.errors import RegistryError
from pollinate.export._triton import write_triton_entry
from pollinate.log import logger
from pollinate.rundir.tracking import mlflow_client
from pollinate.serving.repository import REGISTRY_FILE

__all__ = ["sync_once", "watch"]

_ONNX = "model.fp32.onnx"


def _aliased(client: Any, model: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    found: dict[str, Any] = {}
    for alias in ("production", "staging"):
        try:
            found[alias] = client.get_model_version_by_alias(model, alias)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
    return found


def _wanted(found: dict[str, Any]) -> list[Any]:
    """The versions to materialise, production first; staging only when newer."""
    production, staging = found.get("production"), found.get("staging")
    wanted = [production] if production is not None else []
    if staging is not None and (
        production is None or int(staging.version) > int(production.version)
    ):
        wanted.append(staging)
    return wanted


def _publish(client: Any, version: Any, repository: Path, name: str) -> None:
    """Download the version's archive, check it, and write it into the repository."""
    if version.tags.get("pollinate.validation") == "failed":
        raise RegistryError(f"version {version.version} failed its export validation; not served")
    with tempfile.TemporaryDirectory(prefix="pollinate-registry-") as tmp_name:
        tmp = Path(tmp_name)
        folder = Path(client.download_artifacts(version.run_id, _artifact_path(version), str(tmp)))
        expected = version.tags.get("pollinate.sha256", "")
        matching = [a for a in sorted(folder.glob("*.tar.gz")) if _sha256(a) == expected]
        if not expected or not matching:
            raise RegistryError(
                f"version {version.version}: no bundle archive with the registered sha256 "
                f"{expected[:12] or '(none)'}..."
            )
        out = tmp / "bundle"
        with tarfile.open(matching[0], "r:gz") as archive:
            archive.extractall(out, filter="data")
        manifests = list(out.glob(f"*/{MANIFEST_NAME}"))
        if len(manifests) != 1 or not (manifests[0].parent / _ONNX).is_file():
            raise RegistryError(f"version {version.version}: the bundle has no {_ONNX} to serve")
        manifest = Manifest.from_json(manifests[0].read_text(encoding="utf-8"))
        write_triton_entry(
            repository, name, int(version.version), manifests[0].parent / _ONNX, manifest
        )


def _write_aliases(model_dir: Path, found: dict[str, Any]) -> None:
    """``registry.json``: the versions of the aliases, rewritten only when they change."""
    versions = {
        alias: int(found[alias].version) if alias in found else None
        for alias in ("production", "staging")
    }
    text = json.dumps(versions) + "\n"
    path = model_dir / REGISTRY_FILE
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _artifact_path(version: Any) -> str:
    prefix = f"runs:/{version.run_id}/"
    source = str(version.source)
    if not source.startswith(prefix):
        raise RegistryError(f"version {version.version}: unexpected source {source!r}")
    return source[len(prefix) :]


def sync_once(
    uri: str,
    model: str,
    repository: Path,
    name: str | None = None,
    *,
    production_only: bool = False,
) -> list[int]:
    """Write the aliased versions the repository lacks; returns the versions written.

    ``production_only``: before a server starts (it serves the newest version it finds, so
    a staging version written now would serve as current instead of as a canary)."""
    name = name or model
    try:
        client = mlflow_client(uri)
        written = []
        found = _aliased(client, model)
        wanted = _wanted(found)
        for version in wanted[:1] if production_only else wanted:
            if (repository / name / str(version.version) / "model.onnx").is_file():
                continue
            _publish(client, version, repository, name)
            written.append(int(version.version))
        if wanted and wanted[0] is found.get("production"):
            _write_aliases(repository / name, found)
        return written
    except RegistryError:
        raise
    except Exception as err:  # MLflow's errors (HTTP, REST) are many
        text = " ".join(str(err).split())[:300]
        raise RegistryError(f"syncing {model} from {uri} failed: {text}") from None


def watch(
    uri: str,
    model: str,
    repository: Path,
    *,
    name: str | None = None,
    interval: float = 10.0,
    stop: Callable[[], bool] = lambda: False,
    on_written: Callable[[list[int]], None] = lambda _versions: None,
) -> None:
    """:func:`sync_once` every ``interval`` s until ``stop()``; a failed sync is a warning."""
    while not stop():
        try:
            written = sync_once(uri, model, repository, name)
        except RegistryError as err:
            logger.warning("registry sync: %s", err)
        else:
            if written:
                on_written(written)
        time.sleep(interval)
