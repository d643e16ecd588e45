"""Named starting points for ``pollinate simulate --preset``; flags override them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pollinate.errors import ConfigError

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A simulation size plus run settings."""

    description: str
    num_clients: int
    settings: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "1000 clients, 10% per round, DP-SGD (noise 1.0, clip 1.0), 5 rounds",
        1000,
        {},
    ),
    "demo": Preset(
        "the README demo: 100 clients, half of them per round, no DP, 12 rounds (>= 90% accuracy)",
        100,
        {
            "dp": "none",
            "fraction-train": 0.5,
            "num-server-rounds": 12,
            "local-epochs": 2,
            "batch-size": 16,
            "learning-rate": 0.05,
            "momentum": 0.9,
        },
    ),
    "quick": Preset(
        "a smoke test: 50 clients, 20% per round, DP-SGD, 2 rounds",
        50,
        {"fraction-train": 0.2, "num-server-rounds": 2},
    ),
    "non-iid": Preset(
        "1000 clients with Dirichlet(0.5) label skew, FedProx, DP-SGD, 5 rounds",
        1000,
        {"partitioner": "dirichlet", "strategy": "fedprox"},
    ),
    "client-dp": Preset(
        "1000 clients, client-level DP (server-side clipping), no sample-level DP, 5 rounds",
        1000,
        {"dp": "none", "client-dp": "server-fixed", "client-dp-noise": 1.0},
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name lists the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
