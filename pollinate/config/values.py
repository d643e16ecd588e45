"""The enumerated settings of a run and how a raw run-config value becomes a typed one."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum, StrEnum
from typing import Any, Literal

from pollinate.errors import ConfigError

__all__ = [
    "EXPORT_FORMATS",
    "ClientDP",
    "ClientSampling",
    "RobustAggregation",
    "SampleDP",
    "StalenessWeighting",
    "StrategyName",
    "coerce",
    "non_negative_float",
    "positive_float",
    "positive_int",
]


class StrategyName(StrEnum):
    """Flower's own aggregation strategies, by name, and ``fedbuff``: buffered asynchronous
    aggregation (Nguyen et al. 2022), the server updating every ``buffer-size`` replies."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDBUFF = "fedbuff"


class StalenessWeighting(StrEnum):
    """How ``fedbuff`` weighs an update computed from a model ``s`` versions old:
    ``polynomial`` by ``1 / sqrt(1 + s)`` (FedBuff's choice), ``constant`` by 1."""

    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"

    def weight(self, staleness: int) -> float:
        """The weight of an update ``staleness`` versions old (at most 1)."""
        if self == StalenessWeighting.CONSTANT:
            return 1.0
        return float(1.0 / math.sqrt(1.0 + staleness))


class RobustAggregation(StrEnum):
    """Byzantine-robust aggregation applied before the strategy's own update rule."""

    NONE = "none"
    KRUM = "krum"
    TRIMMED_MEAN = "trimmed-mean"


class SampleDP(StrEnum):
    """Sample-level DP on each client (Opacus DP-SGD) or plain SGD."""

    NONE = "none"
    DPSGD = "sample"


class ClientDP(StrEnum):
    """Client-level DP: the server clips each client's update and adds Gaussian noise.

    ``server-fixed`` / ``client-fixed``: DP-FedAvg with a fixed clip (on the server, or on the
    clients, e.g. under secure aggregation), fresh noise each round. ``server-adaptive``: the
    clip follows a target quantile of the update norms (Andrew et al. 2021), the noisy count
    it needs accounted with the update. ``ftrl-tree`` / ``ftrl-banded``: DP-FTRL, noise
    correlated across rounds by a binary tree (Kairouz et al. 2021) or a banded square-root
    factorization of the prefix sums (Kalinin & Lampert 2024).
    """

    NONE = "none"
    SERVER_FIXED = "server-fixed"
    CLIENT_FIXED = "client-fixed"
    SERVER_ADAPTIVE = "server-adaptive"
    FTRL_TREE = "ftrl-tree"
    FTRL_BANDED = "ftrl-banded"

    @property
    def correlation(self) -> Literal["independent", "tree", "banded"]:
        """How the mechanism's noise is correlated across rounds."""
        if self == ClientDP.FTRL_TREE:
            return "tree"
        if self == ClientDP.FTRL_BANDED:
            return "banded"
        return "independent"

    @property
    def server_clips(self) -> bool:
        """Whether the server clips each update (so it must see each one)."""
        return self not in (ClientDP.NONE, ClientDP.CLIENT_FIXED)


class ClientSampling(StrEnum):
    """How each round's cohort is drawn.

    ``fixed``: a fixed-size draw, seeded by the run seed, from the connected clients; no
    amplification is claimed. ``poisson``: every client independently with probability
    ``fraction-train``, from coins the run seed does not fix (a trusted sampler: the simulator);
    client-level DP then accounts amplification by sampling.
    """

    FIXED = "fixed"
    POISSON = "poisson"


def enum_value(enum_type: type[Enum], key: str, value: object) -> Any:
    try:
        return enum_type(str(value))
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_type)
        raise ConfigError(
            f"setting {key!r}: unknown value {value!r}; choose one of {choices}"
        ) from None


EXPORT_FORMATS = ("onnx", "openvino", "tflite")


def coerce(key: str, fld: dataclasses.Field[Any], raw: Any) -> Any:
    default = fld.default
    if isinstance(default, Enum):
        return enum_value(type(default), key, raw)
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in {"true", "1", "yes"}:
            return True
        if str(raw).lower() in {"false", "0", "no"}:
            return False
        raise ConfigError(f"setting {key!r} must be true or false, got {raw!r}")
    if isinstance(default, int):
        if isinstance(raw, bool) or not (
            isinstance(raw, int) or (isinstance(raw, float) and raw.is_integer())
        ):
            try:
                return int(str(raw))
            except ValueError:
                raise ConfigError(f"setting {key!r} must be an integer, got {raw!r}") from None
        return int(raw)
    if isinstance(default, float):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"setting {key!r} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"setting {key!r} must be finite, got {raw!r}")
        return value
    return str(raw)


def positive_int(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"setting {key!r} must be a positive integer, got {value}")


def positive_float(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"setting {key!r} must be positive, got {value}")


def non_negative_float(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"setting {key!r} must not be negative, got {value}")
