"""A run's settings: one typed object (:class:`RunSettings`) built from Flower's run config.

``settings`` holds :class:`RunSettings` and its checks; ``values`` the enumerated settings
and the coercion of raw run-config values.
"""

from pollinate.config.settings import RunSettings, bundle_dir
from pollinate.config.values import (
    ClientDP,
    ClientSampling,
    RobustAggregation,
    SampleDP,
    StalenessWeighting,
    StrategyName,
)

__all__ = [
    "ClientDP",
    "ClientSampling",
    "RobustAggregation",
    "RunSettings",
    "SampleDP",
    "StalenessWeighting",
    "StrategyName",
    "bundle_dir",
]
