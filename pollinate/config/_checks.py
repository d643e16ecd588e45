"""Checks of RunSettings that span several settings: client-level DP and buffered rounds.

They take the settings object untyped (``Any``): typing it would import ``settings``, which
imports this module (import-linter forbids the cycle); ``RunSettings.validate`` calls them.
"""

from __future__ import annotations

from typing import Any

from pollinate.config.values import (
    ClientDP,
    ClientSampling,
    RobustAggregation,
    StrategyName,
    non_negative_float,
    positive_float,
    positive_int,
)
from pollinate.errors import ConfigError

__all__ = ["check_buffered", "check_client_dp"]


def check_client_dp(settings: Any) -> None:
    """The client-level DP settings (see :class:`ClientDP`)."""
    if not 0.0 <= settings.server_momentum < 1.0:
        raise ConfigError(
            f"setting 'server-momentum' must be in [0, 1), got {settings.server_momentum}"
        )
    if not 0.0 < settings.client_dp_quantile < 1.0:
        raise ConfigError(
            f"setting 'client-dp-quantile' must be in (0, 1), got {settings.client_dp_quantile};"
            " 0.5 adapts the clip to the median update norm"
        )
    positive_float("client-dp-clip-lr", settings.client_dp_clip_lr)
    non_negative_float("client-dp-count-noise", settings.client_dp_count_noise)
    if settings.client_dp_bands < 0:
        raise ConfigError(
            f"setting 'client-dp-bands' must be >= 0 (0: population / cohort), "
            f"got {settings.client_dp_bands}"
        )
    if settings.client_sampling == ClientSampling.POISSON and settings.client_dp.correlation != (
        "independent"
    ):
        raise ConfigError(
            f"client-sampling='poisson' with client-dp={settings.client_dp.value!r}: DP-FTRL is "
            "accounted without sampling and needs participation limits a Poisson sampler "
            "cannot keep; use client-sampling='fixed'"
        )
    if (
        settings.client_sampling == ClientSampling.POISSON
        and settings.client_dp != ClientDP.NONE
        and settings.participation_bound > 0
    ):
        raise ConfigError(
            "client-sampling='poisson' with a participation-bound: amplification needs every "
            "client to be drawn independently each round; set participation-bound = 0"
        )
    if settings.client_dp != ClientDP.NONE and settings.robust != RobustAggregation.NONE:
        raise ConfigError(
            f"client-dp={settings.client_dp.value!r} with robust={settings.robust.value!r}: the "
            "noise is calibrated to the mean of the clipped updates, and a robust "
            "aggregate may follow a single client; choose one of the two"
        )


def check_buffered(settings: Any) -> None:
    """``fedbuff``'s settings and the fast engine's latency model."""
    positive_int("buffer-size", settings.buffer_size)
    if settings.max_staleness < 0:
        raise ConfigError(
            f"setting 'max-staleness' must be >= 0 (0: only updates from the current model), "
            f"got {settings.max_staleness}"
        )
    non_negative_float("latency-median-s", settings.latency_median_s)
    non_negative_float("latency-sigma", settings.latency_sigma)
    for key, value in (("slow-fraction", settings.slow_fraction), ("dropout", settings.dropout)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"setting {key!r} must be in [0, 1), got {value}")
    positive_float("slow-factor", settings.slow_factor)
    if settings.strategy != StrategyName.FEDBUFF:
        return
    why = ""
    if settings.secure_aggregation:
        why = "secure-aggregation needs every client of a round at once; set it false"
    elif settings.client_sampling == ClientSampling.POISSON:
        why = "client-sampling='poisson' draws whole rounds; use client-sampling='fixed'"
    elif settings.client_dp.correlation != "independent":
        why = (
            f"client-dp={settings.client_dp.value!r} correlates noise across releases at a fixed "
            "spacing that stale updates would break; use 'server-fixed' or 'server-adaptive'"
        )
    if why:
        raise ConfigError(f"strategy='fedbuff' with {why}")
