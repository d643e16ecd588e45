"""Assemble Flower's strategies by name, with robust aggregation and client-level DP wrappers.

The chain is ``DP( Robust( Strategy ) )``:

* ``Strategy`` is one of Flower's own, FedAvg, FedAvgM, FedProx, FedAdam, FedYogi (their
  mean computed flat: :class:`~pollinate.serverapp.averaging.FlatMean`); for ``fedbuff``,
  FedAvgM without momentum (``current + lr * mean``) on the buffer's replies, each
  rewritten as ``current + weight * delta`` (:mod:`pollinate.serverapp.fedbuff`);
* ``Robust`` (optional) replaces the replies by Flower's Krum / trimmed-mean aggregate before
  the strategy's own update rule runs on it, so FedAdam on top of Krum works;
* ``DP`` (optional) is :class:`~pollinate.serverapp.client_dp.ClientLevelDP`: clip, sum,
  the mechanism's (possibly correlated) noise from the secure source, the mean handed on.
  Client-level DP and robust aggregation are not combined (``RunSettings`` refuses it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedTrimmedAvg, Krum, Strategy

from pollinate.config import ClientDP, RobustAggregation, RunSettings, SampleDP, StrategyName
from pollinate.log import logger
from pollinate.protocol import NUM_EXAMPLES_KEY, UNIFORM_WEIGHT_KEY
from pollinate.serverapp.averaging import (
    FlatMean,
    FlatMeanFedAdam,
    FlatMeanFedAvgM,
    FlatMeanFedProx,
    FlatMeanFedYogi,
    weighted_metrics,
)
from pollinate.serverapp.client_dp import ClientLevelDP, plan_client_dp

__all__ = [
    "RobustAggregator",
    "build_strategy",
    "set_current_model",
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
        metrics = weighted_metrics([m.content for m in replies], self.inner.weighted_by_key)
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


def build_strategy(settings: RunSettings, *, population: int) -> Strategy:
    """The strategy chain for ``settings`` with ``population`` clients."""
    weight_key = weight_key_for(settings)
    common: dict[str, Any] = {
        "fraction_train": 1.0,  # the ServerApp samples; the strategy takes whom it is given
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        "weighted_by_key": weight_key,
        "train_metrics_aggr_fn": weighted_metrics,  # Flower's, in plain floats
        "evaluate_metrics_aggr_fn": weighted_metrics,
    }
    # Flower's strategies, their weighted mean computed flat (averaging.FlatMean)
    inner: FedAvg
    if settings.strategy == StrategyName.FEDAVG:
        inner = FlatMean(**common)
    elif settings.strategy == StrategyName.FEDAVGM:
        inner = FlatMeanFedAvgM(
            server_learning_rate=settings.server_lr(),
            server_momentum=settings.server_momentum,
            **common,
        )
    elif settings.strategy == StrategyName.FEDBUFF:  # x + lr * (mean of the weighted deltas)
        inner = FlatMeanFedAvgM(
            server_learning_rate=settings.server_lr(), server_momentum=0.0, **common
        )
    elif settings.strategy == StrategyName.FEDPROX:
        inner = FlatMeanFedProx(proximal_mu=settings.proximal_mu, **common)
    elif settings.strategy == StrategyName.FEDADAM:
        inner = FlatMeanFedAdam(eta=settings.server_lr(), **common)
    else:
        inner = FlatMeanFedYogi(eta=settings.server_lr(), **common)
    strategy: Strategy = inner
    if settings.robust == RobustAggregation.KRUM:
        strategy = RobustAggregator(
            inner, Krum(num_malicious_nodes=settings.num_malicious, **common)
        )
    elif settings.robust == RobustAggregation.TRIMMED_MEAN:
        strategy = RobustAggregator(inner, FedTrimmedAvg(beta=settings.trim_beta, **common))
    plan = plan_client_dp(settings, population=population)
    if plan is None:
        return strategy
    return ClientLevelDP(
        strategy,
        plan,
        weight_key=weight_key,
        quantile=settings.client_dp_quantile,
        clip_lr=settings.client_dp_clip_lr,
        reproducible_seed=settings.seed if settings.reproducible_noise else None,
    )


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
        if isinstance(part, ClientLevelDP):
            state.update({f"{depth}/dp/{k}": v for k, v in part.state().items()})
        momentum = getattr(part, "momentum_vector", None)
        if isinstance(momentum, list):  # FedAvgM's server momentum
            state.update({f"{depth}/momentum/{i}": np.asarray(v) for i, v in enumerate(momentum)})
        for attr in ("m_t", "v_t"):
            value = getattr(part, attr, None)
            if isinstance(value, dict):
                for key, arr in value.items():
                    state[f"{depth}/{attr}/{key}"] = np.asarray(arr)
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put arrays saved by :func:`strategy_state` back into the chain."""
    parts = _chain(strategy)
    dp: dict[int, dict[str, np.ndarray]] = {}
    momentum: dict[int, dict[int, np.ndarray]] = {}
    for name, arr in state.items():
        depth_s, attr, key = name.split("/", 2)
        part = parts[int(depth_s)]
        if attr == "dp":
            dp.setdefault(int(depth_s), {})[key] = arr
            continue
        if attr == "momentum":
            momentum.setdefault(int(depth_s), {})[int(key)] = arr
            continue
        current = getattr(part, attr, None)
        if not isinstance(current, dict):
            current = {}
            setattr(part, attr, current)
        current[key] = arr
    for depth, arrays in dp.items():
        wrapper = parts[depth]
        assert isinstance(wrapper, ClientLevelDP)
        wrapper.load_state(arrays)
    for depth, vectors in momentum.items():
        parts[depth].momentum_vector = [vectors[i] for i in sorted(vectors)]  # type: ignore[attr-defined]


def set_current_model(strategy: Strategy, arrays: ArrayRecord) -> None:
    """Tell the chain which model updates are measured from: the client-level DP wrapper and
    FedAvgM learn it in ``configure_train``, and buffered rounds may release a buffer with no
    send since the last release (or, resumed, before any)."""
    for part in _chain(strategy):
        if isinstance(part, ClientLevelDP | FedAvgM):
            part.current_arrays = arrays


def dp_wrapper(strategy: Strategy) -> ClientLevelDP | None:
    """The client-level DP wrapper of the chain, if any."""
    for part in _chain(strategy):
        if isinstance(part, ClientLevelDP):
            return part
    return None


def known_strategies() -> list[str]:
    """Names accepted for the ``strategy`` setting."""
    return [s.value for s in StrategyName]
