"""Exported bundles as versions of an MLflow registered model, and the aliases that stage them.

:func:`register_bundle` logs a bundle's archive to the run's MLflow run (the one
``RUN_DIR/mlflow.json`` names, or a new one) and registers it as a new version of the
registered model named after the bundle's model, with lineage tags (:class:`Lineage`:
pollinate's run, the MLflow run, round, epsilons, accuracy, the archive's sha256, whether the
export's validation passed). A validated version gets the alias ``candidate``. :func:`promote`
moves ``staging`` or ``production`` to a version (refusing one whose validation failed) and
:func:`rollback` moves ``production`` back to the version it held before; the history of
``production`` is a tag of the registered model. mlflow is imported only when called.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.edge_runtime.manifest import MANIFEST_NAME
from pollinate.errors import ConfigError, RegistryError
from pollinate.rundir.records import read_history
from pollinate.rundir.tracking import EXPERIMENT, TRACKING_FILE, mlflow_client, read_tracking_file

__all__ = [
    "ALIASES",
    "Lineage",
    "VersionRow",
    "bundle_lineage",
    "lineage_of",
    "list_versions",
    "model_name",
    "promote",
    "register_bundle",
    "register_job",
    "rollback",
]

#: The stages a version moves through, in order.
ALIASES = ("candidate", "staging", "production")
_HISTORY_TAG = "pollinate.production_history"
_VALIDATION_TAG = "pollinate.validation"


@dataclass(frozen=True)
class Lineage:
    """Where a registered version comes from (each field becomes a ``pollinate.*`` tag)."""

    run: str
    round: int
    accuracy: float | None
    epsilon: float | None
    client_epsilon: float | None
    sha256: str
    validation: str  # "passed" or "failed"
    reason: str = ""

    def tags(self) -> dict[str, str]:
        """The version's tags (empty values left out)."""
        raw = {
            "pollinate.run": self.run,
            "pollinate.round": self.round,
            "pollinate.accuracy": self.accuracy,
            "pollinate.epsilon": self.epsilon,
            "pollinate.client_epsilon": self.client_epsilon,
            "pollinate.sha256": self.sha256,
            _VALIDATION_TAG: self.validation,
            "pollinate.validation_error": self.reason[:4000],
        }
        return {k: str(v) for k, v in raw.items() if v is not None and v != ""}


@dataclass(frozen=True)
class VersionRow:
    """One registered version as ``pollinate registry list`` shows it."""

    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lineage_of(
    run_dir: Path,
    archive: Path | None,
    *,
    server_round: int,
    accuracy: float | None,
    validation: str = "passed",
    reason: str = "",
) -> Lineage:
    """The lineage of a model exported from ``run_dir`` at ``server_round``: epsilons from the
    run's ``metrics.json``, the sha256 of ``archive`` (or of the round's checkpoint)."""
    record = None
    try:
        rows = [r for r in read_history(run_dir) if r.server_round <= server_round]
        record = rows[-1] if rows else None
    except Exception:
        record = None
    target = archive if archive is not None else _checkpoint_model(run_dir, server_round)
    return Lineage(
        run=Path(run_dir).resolve().name,
        round=server_round,
        accuracy=accuracy,
        epsilon=None if record is None else record.max_epsilon,
        client_epsilon=None if record is None else record.client_level_epsilon,
        sha256=_sha256(target) if target is not None and target.is_file() else "",
        validation=validation,
        reason=reason,
    )


def bundle_lineage(run_dir: Path, archive: Path) -> tuple[str, Lineage]:
    """The registered model's name and the lineage of a validated bundle, from the manifest
    in the folder beside its archive (``NAME.tar.gz`` -> ``NAME/manifest.json``)."""
    folder = archive.parent / archive.name.removesuffix(".tar.gz")
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    info = manifest["model"]
    lineage = lineage_of(
        run_dir,
        archive,
        server_round=int(info["source_round"]),
        accuracy=manifest.get("torch_accuracy"),
    )
    return model_name(str(info["name"])), lineage


def model_name(name: str) -> str:
    """A registered model's name for a model's name or import path (``pkg.mod:Net`` ->
    ``pkg.mod-Net``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def _checkpoint_model(run_dir: Path, server_round: int) -> Path | None:
    path = Path(run_dir) / "checkpoints" / f"round-{server_round:04d}" / "model.safetensors"
    return path if path.is_file() else None


def register_job(
    model: str, files: list[Path], lineage: Lineage, run_dir: Path
) -> Callable[[Any, str], str]:
    """The registration as a job ``job(client, mlflow_run_id) -> version`` (for the tracking
    thread, or :func:`register_bundle`)."""

    def job(client: Any, run_id: str) -> str:
        from mlflow.exceptions import MlflowException

        folder = f"bundles/{lineage.run}-r{lineage.round:04d}-{lineage.sha256[:12]}"
        for path in files:
            client.log_artifact(run_id, str(path), folder)
        try:
            client.create_registered_model(model, tags={"pollinate.source": "pollinate export"})
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {**lineage.tags(), "mlflow.run_id": run_id, "pollinate.run_dir": str(run_dir)}
        version = client.create_model_version(
            model, f"runs:/{run_id}/{folder}", run_id=run_id, tags=tags
        )
        if lineage.validation == "passed":
            client.set_registered_model_alias(model, "candidate", version.version)
        return str(version.version)

    return job


def register_bundle(
    uri: str, run_dir: Path, model: str, files: list[Path], lineage: Lineage
) -> str:
    """Register ``files`` (the bundle's archive, or the model a failed export left) as a new
    version of ``model`` now; returns the version. Raises :class:`RegistryError`."""
    try:
        client = mlflow_client(uri)
        run_id = _mlflow_run(client, uri, Path(run_dir))
        return register_job(model, files, lineage, Path(run_dir))(client, run_id)
    except RegistryError:
        raise
    except Exception as err:
        raise RegistryError(f"cannot register {model} at {uri}: {_short(err)}") from None


def _mlflow_run(client: Any, uri: str, run_dir: Path) -> str:
    """The MLflow run of ``run_dir`` (``mlflow.json``), or a new one for an untracked run."""
    linked = read_tracking_file(run_dir)
    if linked.get("run_id") and linked.get("tracking_uri") == uri:
        return linked["run_id"]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(EXPERIMENT)
    )
    tags = {"pollinate.run": run_dir.resolve().name, "pollinate.run_dir": str(run_dir.resolve())}
    run = client.create_run(experiment_id, run_name=run_dir.resolve().name, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    if not linked:
        from pollinate._atomic import atomic_write_text

        document = {"tracking_uri": uri, "run_id": run.info.run_id}
        atomic_write_text(run_dir / TRACKING_FILE, json.dumps(document, indent=2) + "\n")
    return str(run.info.run_id)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _call(uri: str, what: str, fn: Callable[[Any], Any]) -> Any:
    try:
        return fn(mlflow_client(uri))
    except RegistryError:
        raise
    except Exception as err:
        raise RegistryError(f"{what} at {uri} failed: {_short(err)}") from None


def list_versions(uri: str, model: str) -> list[VersionRow]:
    """Every version of ``model``, newest first, with its aliases and tags."""

    def run(client: Any) -> list[VersionRow]:
        found = client.search_model_versions(f"name = '{model}'")
        if not found:
            raise RegistryError(f"no registered model {model!r} at {uri}; export a run first")
        aliases: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(model).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        rows = [
            VersionRow(str(v.version), tuple(sorted(aliases.get(str(v.version), []))), v.tags)
            for v in found
        ]
        return sorted(rows, key=lambda r: int(r.version), reverse=True)

    result: list[VersionRow] = _call(uri, f"listing {model}", run)
    return result


def promote(uri: str, model: str, version: str | None, to: str) -> str:
    """Point alias ``to`` (staging or production) at ``version`` (default: the version of the
    alias before it: candidate -> staging -> production); returns the version."""
    if to not in ALIASES[1:]:
        raise ConfigError(f"--to {to!r}: promote to 'staging' or 'production'")

    def run(client: Any) -> str:
        chosen = version or _alias_version(client, model, ALIASES[ALIASES.index(to) - 1])
        found = client.get_model_version(model, chosen)
        if found.tags.get(_VALIDATION_TAG) == "failed":
            raise RegistryError(
                f"{model} version {chosen} failed its export validation; it cannot be promoted"
            )
        if to == "production":
            history = client.get_registered_model(model).tags.get(_HISTORY_TAG, "")
            entries = [v for v in history.split(",") if v]
            if not entries or entries[-1] != chosen:
                entries.append(chosen)
            client.set_registered_model_tag(model, _HISTORY_TAG, ",".join(entries[-50:]))
        client.set_registered_model_alias(model, to, chosen)
        return str(chosen)

    result: str = _call(uri, f"promoting {model}", run)
    return result


def rollback(uri: str, model: str) -> str:
    """Point ``production`` back at the version it held before; returns that version."""

    def run(client: Any) -> str:
        history = client.get_registered_model(model).tags.get(_HISTORY_TAG, "")
        entries = [v for v in history.split(",") if v]
        if len(entries) < 2:
            raise RegistryError(
                f"{model} has no earlier production version to roll back to "
                f"(production history: {history or 'empty'})"
            )
        entries.pop()
        client.set_registered_model_tag(model, _HISTORY_TAG, ",".join(entries))
        client.set_registered_model_alias(model, "production", entries[-1])
        return str(entries[-1])

    result: str = _call(uri, f"rolling back {model}", run)
    return result


def _alias_version(client: Any, model: str, alias: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RegistryError(
            f"{model} has no {alias!r} version to promote; name one: "
            f"pollinate registry promote {model} VERSION"
        ) from None
