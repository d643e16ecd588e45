"""How long each device takes to answer, and who never does: one model for the simulation
and for a real fleet that emulates it.

A fleet is not ten equal machines: compute times spread log-normally, some devices (old
phones, busy ones) are an order of magnitude slower, and some go offline mid-task. The
:class:`LatencyModel` draws, for each message a device is sent, the seconds until its reply
(``median_s`` times ``exp(sigma * N(0, 1))``, times ``slow_factor`` for the ``slow_fraction``
of devices that are slow, the same ones all run) or ``None`` for a drop-out (probability
``dropout``). Draws follow from the seed, the device and how many messages it was sent
before, so a run is repeatable. These are emulated conditions, not DP randomness: nothing
private follows from them.

The fast engine keeps simulated time by it (:mod:`pollinate.simulation.latency`); a real
device started with ``pollinate edge run --emulate-latency SPEC`` answers its train messages
as late as the same model says (:mod:`pollinate.clientapp.latency`), so a straggler
scenario runs alike on both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pollinate.errors import ConfigError

__all__ = ["LatencyModel"]

_SLOW, _DRAW = 0x510, 0x1A7  # streams of the seed: who is slow, each message's latency
#: ``--emulate-latency`` names -> fields
_SPEC = {"median": "median_s", "sigma": "sigma", "slow-fraction": "slow_fraction",
         "slow-factor": "slow_factor", "dropout": "dropout", "seed": "seed"}  # fmt: skip


@dataclass(frozen=True)
class LatencyModel:
    """Per-message reply times of a fleet (see the module docstring)."""

    median_s: float = 0.0
    sigma: float = 0.5
    slow_fraction: float = 0.0
    slow_factor: float = 10.0
    dropout: float = 0.0
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Any) -> LatencyModel:
        """A run's model (``latency-*``, ``slow-*``, ``dropout`` and ``seed``)."""
        return cls(
            median_s=settings.latency_median_s,
            sigma=settings.latency_sigma,
            slow_fraction=settings.slow_fraction,
            slow_factor=settings.slow_factor,
            dropout=settings.dropout,
            seed=settings.seed,
        )

    @classmethod
    def parse(cls, spec: str) -> LatencyModel:
        """``median=2,sigma=0.5,slow-fraction=0.1,slow-factor=10,dropout=0.05,seed=42``
        (any subset; ``median`` is required and the rest default as in the simulation).

        Raises:
            ConfigError: An unknown name, a value that is not a number, or one out of range.
        """
        values: dict[str, Any] = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, sep, raw = part.partition("=")
            field = _SPEC.get(name.strip())
            if not sep or field is None:
                raise ConfigError(
                    f"latency spec {spec!r}: {part!r} is not NAME=VALUE with NAME one of "
                    f"{', '.join(_SPEC)}; e.g. median=2,slow-fraction=0.1"
                )
            try:
                values[field] = int(raw) if field == "seed" else float(raw)
            except ValueError:
                raise ConfigError(
                    f"latency spec {spec!r}: {name}={raw!r} is not a number"
                ) from None
        if "median_s" not in values:
            raise ConfigError(f"latency spec {spec!r}: median=SECONDS is required")
        model = cls(**values)
        model.check(f"latency spec {spec!r}")
        return model

    def spec(self) -> str:
        """The model as :meth:`parse` reads it."""
        by_field = {f: n for n, f in _SPEC.items()}
        return ",".join(f"{by_field[f.name]}={getattr(self, f.name)}" for f in fields(self))

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError` (prefixed with ``where``) for a value out of range."""
        for name, value in (("median", self.median_s), ("sigma", self.sigma)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}: {name} must be a number >= 0, got {value}")
        for name, value in (("slow-fraction", self.slow_fraction), ("dropout", self.dropout)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{where}: {name} must be in [0, 1), got {value}")
        if not (math.isfinite(self.slow_factor) and self.slow_factor > 0):
            raise ConfigError(f"{where}: slow-factor must be > 0, got {self.slow_factor}")
        if self.seed < 0:
            raise ConfigError(f"{where}: seed must be >= 0, got {self.seed}")

    @property
    def enabled(self) -> bool:
        """Whether replies take any time or ever go missing."""
        return self.median_s > 0 or self.dropout > 0

    def is_slow(self, device: int) -> bool:
        """Whether ``device`` is one of the slow ones (fixed for the run)."""
        if self.slow_fraction <= 0:
            return False
        return bool(np.random.default_rng([self.seed, device, _SLOW]).random() < self.slow_fraction)

    def draw(self, device: int, nth: int) -> float | None:
        """Seconds until ``device`` answers its ``nth`` message (from 0); ``None``: never."""
        rng = np.random.default_rng([self.seed, device, nth, _DRAW])
        dropped = rng.random() < self.dropout
        seconds = self.median_s * math.exp(self.sigma * float(rng.standard_normal()))
        if dropped:
            return None
        return seconds * (self.slow_factor if self.is_slow(device) else 1.0)
