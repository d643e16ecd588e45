"""Assemble Flower's strategies by name, with robust aggregation and client-level DP wrappers.

The chain is ``DP( Robust( Strategy ) )``:

* ``Strategy`` is one of Flower's own: FedAvg, FedProx, FedAdam, FedYogi;
* ``Robust`` (optional) replaces the replies by Flower's Krum / trimmed-mean aggregate before
  the strategy's own update rule runs on it, so FedAdam on top of Krum works;
* ``DP`` (optional) is Flower's DifferentialPrivacy{Server,Client}SideFixedClipping with
  Flower's RdpAccountant (no amplification, as Flower requires for fixed clipping).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from pollinate.config import ClientDP, RobustAggregation, RunSettings, SampleDP, StrategyName
from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.privacy.noise import NoiseSource, gaussian
from pollinate.protocol import NUM_EXAMPLES_KEY, UNIFORM_WEIGHT_KEY

__all__ = [
    "RobustAggregator",
    "SecureClientSideClipping",
    "SecureServerSideClipping",
    "build_strategy",
    "client_level_accountant",
    "strategy_state",
    "weight_key_for",
]

WEIGHT_KEY = NUM_EXAMPLES_KEY


class RobustAggregator(Strategy):
    """Run Flower's Krum or trimmed mean first, then hand one reply to the inner strategy."""

    def __init__(self, inner: FedAvg, robust: FedAvg) -> None:
        self.inner = inner
        self.robust = robust

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, _ = self.robust.aggregate_train(server_round, replies)
        if arrays is None:
            return None, None
        metrics = aggregate_metricrecords([m.content for m in replies], self.inner.weighted_by_key)
        summary = Message(
            RecordDict(
                {
                    "arrays": arrays,
                    "metrics": MetricRecord({self.inner.weighted_by_key: 1}),
                }
            ),
            dst_node_id=0,
            message_type="train",
        )
        new_arrays, _ = self.inner.aggregate_train(server_round, [_as_reply(summary)])
        return new_arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        logger.info("robust aggregation %s before %s", type(self.robust).__name__, self.inner)
        self.inner.summary()


def _as_reply(msg: Message) -> Message:
    """A reply-shaped copy of ``msg`` (Flower's aggregation reads only the content)."""
    return Message(msg.content, reply_to=msg)


def weight_key_for(settings: RunSettings) -> str:
    """What replies are weighted by: their sample count, or equally under any DP (a DP reply
    carries no exact count of the device's data, and client-level DP needs equal weights)."""
    if settings.client_dp != ClientDP.NONE or settings.dp == SampleDP.DPSGD:
        return UNIFORM_WEIGHT_KEY
    return WEIGHT_KEY


class _SecureNoise:
    """Client-level noise from the secure source (Flower's wrappers draw it from numpy's
    global generator, which the run seed would fix)."""

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    reproducible_seed: int | None = None

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
        self._releases = getattr(self, "_releases", 0) + 1
        source = (
            NoiseSource.for_tests(self.reproducible_seed, self._releases)
            if self.reproducible_seed is not None
            else NoiseSource.secure()
        )
        out = ArrayRecord()
        for step, (key, array) in enumerate(aggregated_arrays.items()):
            value = array.numpy()
            noise = gaussian(value.shape, std, source.generator(step=step), dtype=torch.float64)
            out[key] = Array(np.asarray(value + noise.numpy().astype(value.dtype)))
        logger.info("client-level DP: noise of std %.4g added to the aggregate", std)
        return out


class SecureServerSideClipping(_SecureNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP-FedAvg with noise from the secure source."""


class SecureClientSideClipping(_SecureNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP-FedAvg with noise from the secure source."""


def build_strategy(settings: RunSettings, *, population: int) -> Strategy:
    """The strategy chain for ``settings`` with ``population`` clients."""
    sample_size = settings.sample_size(population)
    weight_key = weight_key_for(settings)
    common: dict[str, Any] = {
        "fraction_train": 1.0,  # the ServerApp samples; the strategy takes whom it is given
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        "weighted_by_key": weight_key,
    }
    inner: FedAvg
    if settings.strategy == StrategyName.FEDAVG:
        inner = FedAvg(**common)
    elif settings.strategy == StrategyName.FEDPROX:
        inner = FedProx(proximal_mu=settings.proximal_mu, **common)
    elif settings.strategy == StrategyName.FEDADAM:
        inner = FedAdam(eta=settings.server_learning_rate, **common)
    else:
        inner = FedYogi(eta=settings.server_learning_rate, **common)
    strategy: Strategy = inner
    if settings.robust == RobustAggregation.KRUM:
        strategy = RobustAggregator(
            inner, Krum(num_malicious_nodes=settings.num_malicious, **common)
        )
    elif settings.robust == RobustAggregation.TRIMMED_MEAN:
        strategy = RobustAggregator(inner, FedTrimmedAvg(beta=settings.trim_beta, **common))
    if settings.client_dp == ClientDP.NONE:
        return strategy
    accountant = client_level_accountant(settings, population=population)
    kwargs: dict[str, Any] = {
        "noise_multiplier": client_noise(settings, population=population),
        "clipping_norm": settings.client_dp_clip,
        "num_sampled_clients": sample_size,
    }
    if isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train:
        kwargs["accountant"] = accountant
    else:
        logger.warning(
            "client-level DP with %s: Flower's accountant needs plain FedAvg aggregation, "
            "so client-level epsilon is not reported for this combination",
            settings.strategy.value if settings.robust == RobustAggregation.NONE else "robust",
        )
    wrapper: SecureServerSideClipping | SecureClientSideClipping
    if settings.client_dp == ClientDP.SERVER_FIXED:
        wrapper = SecureServerSideClipping(strategy, **kwargs)
    else:
        wrapper = SecureClientSideClipping(strategy, **kwargs)
    if settings.reproducible_noise:
        wrapper.reproducible_seed = settings.seed
    return wrapper


def client_level_accountant(settings: RunSettings, *, population: int) -> Any:
    """Flower's RdpAccountant for client-level DP (fixed clipping: no amplification)."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    budget = settings.client_dp_budget if settings.client_dp_budget > 0 else None
    try:
        config = PrivacyConfig(
            target_delta=settings.target_delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=budget,
        )
    except ValueError as err:
        raise ConfigError(f"client-level DP settings: {err}") from err
    return RdpAccountant(config)


def client_noise(settings: RunSettings, *, population: int) -> float:
    """Client-level noise multiplier: as given, or the smallest that keeps the whole run
    (``num-server-rounds`` releases) within ``client-dp-target-epsilon`` by Flower's
    RdpAccountant."""
    target = settings.client_dp_target_epsilon
    if target == 0:
        return settings.client_dp_noise
    from flwr.serverapp import GaussianPrivacyEvent

    sample = settings.sample_size(population)

    def epsilon(noise: float) -> float:
        acc = client_level_accountant(settings.replace(client_dp_budget=0.0), population=population)
        event = GaussianPrivacyEvent(
            noise_multiplier=noise, sample_size=sample, population_size=population
        )
        acc.compose(event, count=settings.num_server_rounds)
        return float(acc.get_epsilon(settings.target_delta))

    low, high = 0.01, 1.0
    while epsilon(high) > target:
        high *= 2
        if high > 1e4:
            raise ConfigError(f"client-dp-target-epsilon {target} cannot be reached")
    for _ in range(40):
        mid = (low + high) / 2
        if epsilon(mid) > target:
            low = mid
        else:
            high = mid
    return high


def _chain(strategy: Strategy) -> list[Strategy]:
    out = [strategy]
    while True:
        inner = getattr(out[-1], "strategy", None) or getattr(out[-1], "inner", None)
        if not isinstance(inner, Strategy):
            return out
        out.append(inner)


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Server-optimizer state (FedAdam/FedYogi moments) of the chain, as flat named arrays."""
    state: dict[str, np.ndarray] = {}
    for depth, part in enumerate(_chain(strategy)):
        for attr in ("m_t", "v_t"):
            value = getattr(part, attr, None)
            if isinstance(value, dict):
                for key, arr in value.items():
                    state[f"{depth}/{attr}/{key}"] = np.asarray(arr)
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put arrays saved by :func:`strategy_state` back into the chain."""
    parts = _chain(strategy)
    for name, arr in state.items():
        depth_s, attr, key = name.split("/", 2)
        part = parts[int(depth_s)]
        current = getattr(part, attr, None)
        if not isinstance(current, dict):
            current = {}
            setattr(part, attr, current)
        current[key] = arr


def dp_wrapper(strategy: Strategy) -> Any:
    """The client-level DP wrapper of the chain, if any."""
    for part in _chain(strategy):
        if isinstance(
            part,
            DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyClientSideFixedClipping,
        ):
            return part
    return None


def known_strategies() -> list[str]:
    """Names accepted for the ``strategy`` setting."""
    return [s.value for s in StrategyName]
