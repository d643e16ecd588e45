"""The version set: which versions of each served model are loaded, and in which role.

* :class:`LoadedVersion`: one version in service: its batcher, metric children, drift
  monitor, the traffic it answered since the last canary started (:class:`TrafficWindow`)
  and its role;
* :class:`ModelVersions`: one model's current version, its canary, the versions an A/B
  experiment pins, and the versions refused;
* :class:`VersionSet`: every served model's, with the look-ups the protocol layers need
  (:class:`ModelNotFoundError` when there is no such model or version).

Nothing here decides anything: the roll-out policy (``rollout.py``) changes the roles.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pollinate.serving.batcher import Batcher
from pollinate.serving.drift import DriftMonitor
from pollinate.serving.recorder import VersionMetrics
from pollinate.serving.repository import ModelSpec, VersionFiles

__all__ = [
    "LoadedVersion",
    "ModelNotFoundError",
    "ModelVersions",
    "Role",
    "TrafficWindow",
    "VersionSet",
]

Role = Literal["current", "canary", "pinned", "draining"]


class ModelNotFoundError(LookupError):
    """No such model, or that version is not loaded (HTTP 404 / NOT_FOUND)."""


@dataclass
class TrafficWindow:
    """Requests, failures and latencies of one version since the canary started."""

    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=5000))

    def answered(self, seconds: float) -> None:
        """One request answered in ``seconds``."""
        self.requests += 1
        self.latencies.append(seconds)

    def failed(self) -> None:
        """One request the version itself failed (timed out or the model raised)."""
        self.requests += 1
        self.errors += 1

    def p95(self) -> float:
        return (
            float(np.percentile(np.fromiter(self.latencies, float), 95)) if self.latencies else 0.0
        )

    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass
class LoadedVersion:
    """One version in service: its batcher, metrics children and drift monitor."""

    spec: ModelSpec
    files: VersionFiles
    batcher: Batcher
    backend: str
    device: str
    max_batch: int
    drift: DriftMonitor | None
    metrics: VersionMetrics
    window: TrafficWindow = field(default_factory=TrafficWindow)
    role: Role = "current"

    @property
    def version(self) -> int:
        return self.files.version


@dataclass
class ModelVersions:
    """One model's versions: the current one, the canary, those an A/B experiment pins (only
    requests naming them reach them), those refused (by fingerprint), and the registry's
    production version last followed (``registry.json``)."""

    current: LoadedVersion | None = None
    canary: LoadedVersion | None = None
    rejected: dict[int, tuple[tuple[str, int, int], ...]] = field(default_factory=dict)
    pinned: dict[int, LoadedVersion] = field(default_factory=dict)
    production: int | None = None

    def loaded(self) -> list[LoadedVersion]:
        """The versions taking traffic, current first."""
        return [v for v in (self.current, self.canary, *self.pinned.values()) if v is not None]


class VersionSet:
    """Every served model and its :class:`ModelVersions`."""

    def __init__(self) -> None:
        self._models: dict[str, ModelVersions] = {}

    def entry(self, model: str) -> ModelVersions:
        """The versions of ``model``, added (empty) if it is new."""
        return self._models.setdefault(model, ModelVersions())

    def lookup(self, model: str) -> ModelVersions | None:
        """The versions of ``model``, or None if it is not known."""
        return self._models.get(model)

    def items(self) -> list[tuple[str, ModelVersions]]:
        """Every model and its versions (a copy: safe to change roles while iterating)."""
        return list(self._models.items())

    def loaded(self) -> Iterator[LoadedVersion]:
        """Every version taking traffic, model by model, current first."""
        for versions in self._models.values():
            yield from versions.loaded()

    def models(self) -> dict[str, list[int]]:
        """Model name -> loaded versions (current first)."""
        return {name: [v.version for v in entry.loaded()] for name, entry in self._models.items()}

    def ready(self) -> bool:
        """Whether every known model has a current version."""
        return all(entry.current is not None for entry in self._models.values())

    def get(self, model: str, version: int | None = None) -> LoadedVersion:
        """The current version of ``model``, or the loaded ``version`` of it."""
        entry = self._models.get(model)
        if entry is None or entry.current is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"model {model!r} is not served (served models: {known})")
        if version is None:
            return entry.current
        for loaded in entry.loaded():
            if loaded.version == version:
                return loaded
        have = ", ".join(str(v) for v in self.models()[model])
        raise ModelNotFoundError(
            f"model {model!r} version {version} is not loaded (loaded: {have})"
        )
