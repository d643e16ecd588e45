"""Typed settings of A/B/n experiments: the ``[ab]`` table of ``pollinate serve --config``.

Each sub-table ``[ab.NAME]`` is one experiment on the requests to ``model`` that name no
version; its variants are models of the repository, each at its current version (canary
roll-out included) or pinned to one version. ``config.py`` carries the result in
``ServeSettings.ab``; ``ab_routing.py`` runs it; the layout is in ``config.py``'s docstring.
Every problem is one :class:`ConfigError` naming the field (``[ab.new-cnn] variants[1].weight``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pollinate.errors import ConfigError

__all__ = [
    "MAX_VARIANTS",
    "ABMetric",
    "ABSettings",
    "ExperimentSettings",
    "VariantSettings",
    "ab_settings_from_dict",
    "parse_ab_table",
]

ABMetric = Literal["accuracy", "reward"]
MAX_VARIANTS = 5
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,63}")
_CHARS = "letters, digits, '-', '_' and '.'"


@dataclass(frozen=True)
class VariantSettings:
    """One arm of an A/B/n experiment: ``model`` at ``version`` (None: whatever version is
    current, canary roll-out included)."""

    name: str
    model: str
    version: int | None = None
    weight: float = 0.0

    @property
    def target(self) -> str:
        """``model`` or ``model/version``."""
        return self.model if self.version is None else f"{self.model}/{self.version}"


@dataclass(frozen=True)
class ExperimentSettings:
    """An A/B/n experiment on the unversioned requests of ``model`` (see ``abtest.py``)."""

    name: str
    model: str
    variants: tuple[VariantSettings, ...]
    metric: ABMetric = "accuracy"
    alpha: float = 0.05
    margin: float = 0.01
    mixture_sd: float = 0.02
    min_samples: int = 100

    def __post_init__(self) -> None:
        where = f"[ab.{self.name}]"
        if not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"A/B experiment name {self.name!r}: use {_CHARS} (it names the state "
                "file), for example [ab.new-cnn]"
            )
        if not 2 <= len(self.variants) <= MAX_VARIANTS:
            raise ConfigError(
                f"{where} variants: {len(self.variants)} given; an experiment has 2 to "
                f"{MAX_VARIANTS} (the first is the control)"
            )
        seen: set[str] = set()
        for i, v in enumerate(self.variants):
            if not _VARIANT_NAME.fullmatch(v.name) or v.name in seen:
                raise ConfigError(
                    f"{where} variants[{i}].name {v.name!r} must be unique and made of "
                    f"{_CHARS} (and '/')"
                )
            seen.add(v.name)
            if not (math.isfinite(v.weight) and v.weight > 0):
                raise ConfigError(f"{where} variants[{i}].weight must be > 0, got {v.weight}")
            if v.version is not None and v.version < 1:
                raise ConfigError(f"{where} variants[{i}].version must be >= 1, got {v.version}")
        total = math.fsum(v.weight for v in self.variants)
        if abs(total - 1.0) > 1e-9:
            raise ConfigError(
                f"{where} variants: the weights sum to {total!r}; they must sum to 1 (within "
                "1e-9), for example 0.5, 0.25, 0.25"
            )
        if self.metric not in get_args(ABMetric):
            raise ConfigError(f"{where} metric must be accuracy or reward, got {self.metric!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"{where} alpha must be in (0, 1), got {self.alpha}")
        if not self.margin >= 0.0:
            raise ConfigError(f"{where} margin must be >= 0, got {self.margin}")
        if not self.mixture_sd > 0.0:
            raise ConfigError(f"{where} mixture-sd must be positive, got {self.mixture_sd}")
        if self.min_samples < 2:
            raise ConfigError(f"{where} min-samples must be >= 2, got {self.min_samples}")


@dataclass(frozen=True)
class ABSettings:
    """The A/B/n experiments, and where their state is kept."""

    experiments: tuple[ExperimentSettings, ...] = ()
    state_dir: Path = Path("ab-state")
    memory: int = 100_000
    user_header: str = "x-user-id"
    save_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.memory < 1 or not self.save_interval_s > 0:
            raise ConfigError(
                f"[ab] memory and save-interval-s must be positive, got {self.memory} and "
                f"{self.save_interval_s}"
            )
        if not re.fullmatch(r"[a-z0-9-]+", self.user_header):
            raise ConfigError(
                f"[ab] user-header must be a lower-case HTTP header name such as x-user-id, "
                f"got {self.user_header!r}"
            )
        names = [e.name for e in self.experiments]
        models = [e.model for e in self.experiments]
        for label, values in (("name", names), ("model", models)):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ConfigError(f"[ab] two experiments have the same {label}: {twice[0]}")


# ---------------------------------------------------------------------- from TOML / JSON
_SHARED = {"state-dir": "a folder", "memory": "an integer", "user-header": "a string",
           "save-interval-s": "a number"}  # fmt: skip
_EXPERIMENT = {"model": "a string", "metric": "a string", "variants": "a list",
               "alpha": "a number", "margin": "a number", "mixture-sd": "a number",
               "min-samples": "an integer"}  # fmt: skip
_VARIANT = {"name": "a string", "model": "a string", "version": "an integer",
            "weight": "a number"}  # fmt: skip
_TYPES: dict[str, tuple[type, ...]] = {
    "a string": (str,), "a folder": (str,), "a list": (list,),
    "an integer": (int,), "a number": (int, float),
}  # fmt: skip


def _typed(where: str, raw: dict[str, Any], schema: dict[str, str]) -> dict[str, Any]:
    """``raw`` with ``-`` in keys turned to ``_``, each value checked against ``schema``."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        kind = schema.get(key)
        if kind is None:
            raise ConfigError(
                f"{where} has an unknown key {key!r}; valid keys: {', '.join(sorted(schema))}"
            )
        if isinstance(value, bool) or not isinstance(value, _TYPES[kind]):
            raise ConfigError(f"{where} {key} must be {kind}, got {value!r}")
        out[key.replace("-", "_")] = value
    return out


def _experiment(name: str, raw: dict[str, Any]) -> ExperimentSettings:
    where = f"[ab.{name}]"
    values = _typed(where, raw, _EXPERIMENT)
    if "model" not in values or "variants" not in values:
        raise ConfigError(
            f"{where} needs `model` (whose requests are split) and `variants`, for example "
            "variants = [{ version = 3, weight = 0.5 }, { version = 4, weight = 0.5 }]"
        )
    variants = []
    for i, entry in enumerate(values.pop("variants")):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where} variants[{i}] must be a table like {{ version = 3, weight = 0.5 }}"
            )
        v = _typed(f"{where} variants[{i}]", entry, _VARIANT)
        if "weight" not in v:
            raise ConfigError(f"{where} variants[{i}] has no weight")
        v.setdefault("model", values["model"])
        target = v["model"] if v.get("version") is None else f"{v['model']}/{v['version']}"
        v.setdefault("name", target)
        variants.append(VariantSettings(**v))
    return ExperimentSettings(name=name, variants=tuple(variants), **values)


def parse_ab_table(raw: dict[str, Any], base: Path) -> ABSettings:
    """The ``[ab]`` table of a config file in folder ``base`` (a relative ``state-dir`` is
    relative to it; the default is ``base/ab-state``)."""
    shared: dict[str, Any] = {"state_dir": base / "ab-state"}
    experiments = []
    for key, value in raw.items():
        if isinstance(value, dict):
            experiments.append(_experiment(key, value))
            continue
        shared.update(_typed("[ab]", {key: value}, _SHARED))
    shared["state_dir"] = (base / shared["state_dir"]).resolve()
    return ABSettings(experiments=tuple(experiments), **shared)


def ab_settings_from_dict(raw: dict[str, Any]) -> ABSettings:
    """The settings again from ``dataclasses.asdict`` of them (read back from JSON)."""
    experiments = tuple(
        ExperimentSettings(**{**e, "variants": tuple(VariantSettings(**v) for v in e["variants"])})
        for e in raw["experiments"]
    )
    rest = {k: v for k, v in raw.items() if k not in ("experiments", "state_dir")}
    return ABSettings(experiments=experiments, state_dir=Path(raw["state_dir"]), **rest)
