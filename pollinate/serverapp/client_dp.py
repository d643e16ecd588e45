"""Client-level DP on the server: clip, sum, add the mechanism's noise, hand on the mean.

:class:`ClientLevelDP` wraps the strategy chain (``DP( Strategy )``). Each round it

1. clips every reply's update (new - current) to the clip norm in L2 over all parameters
   (``client-fixed``: the clients clipped already and this is a no-op for an honest one;
   under secure aggregation each reply carries the aggregate, whose norm is within the clip);
2. sums the clipped updates and adds the round's noise from a
   :class:`~pollinate.privacy.correlated_noise.NoiseStream` (fresh, tree or banded), of
   standard deviation ``update_noise * clip`` per entry, from the secure source;
3. divides by the planned cohort size ``m`` (fixed, so a missing reply never shrinks the
   denominator the noise was sized for) and gives ``current + mean`` to the inner strategy as
   its only reply, so FedAvg applies it, FedAvgM adds server momentum, FedAdam adapts: all
   post-processing of the noised sum;
4. ``server-adaptive``: moves the clip towards the target quantile of the update norms,
   ``clip *= exp(-lr * (b - quantile))``, where ``b`` is the noised share of updates within
   the clip. The count is of ``bit - 1/2`` (sensitivity 1/2 under add/remove), noised with
   std ``count_noise``; update and count are one Gaussian mechanism of noise multiplier
   ``(update_noise^-2 + (2 count_noise)^-2)^-1/2`` (Andrew et al. 2021, Theorem 1).

:func:`plan_client_dp` settles the parameters once per run (cohort, bands, participation
limits, the noise for a target epsilon by :mod:`pollinate.privacy.client_level`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from pollinate.config import ClientDP, ClientSampling, RunSettings, StrategyName
from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.privacy.client_level import (
    Correlation,
    Epsilons,
    amplified_epsilons,
    calibrate_noise,
    gaussian_epsilons,
    sensitivity,
    worst_sensitivity,
)
from pollinate.privacy.correlated_noise import NoiseStream
from pollinate.privacy.noise import NoiseSource, gaussian
from pollinate.protocol import records_of
from pollinate.serverapp.averaging import weighted_metrics

__all__ = [
    "ACCOUNTING",
    "ClientLevelDP",
    "ClientLevelPlan",
    "account",
    "eligibility",
    "plan_client_dp",
]

#: How client-level releases are accounted (the ledger's ``accounting``).
ACCOUNTING = (
    "worst client's whole history as one Gaussian matrix mechanism, no amplification; "
    "dp-accounting RDP and PLD, the tighter reported"
)


@dataclass(frozen=True)
class ClientLevelPlan:
    """The client-level mechanism of one run, fixed when it starts.

    Attributes:
        mechanism: Which one (:class:`~pollinate.config.ClientDP`).
        noise_multiplier: Std of each released noise entry over the clip; for
            ``server-adaptive`` the joint one of update and count (what is accounted).
        update_noise: The part added to the update (``noise_multiplier`` unless adaptive).
        count_noise: Std of the noised clipped count (``server-adaptive``), else 0.
        clip: The (initial) clip norm.
        cohort: Clients per round ``m``: the denominator of the mean.
        horizon: Rounds the strategy matrix covers (the run's rounds).
        bands: Bands of ``ftrl-banded`` (1 otherwise).
        participations: Most rounds one client contributes to.
        separation: Fewest rounds between two contributions of one client.
        worst_sensitivity: ``||C u||`` of the worst-placed client allowed by the two limits.
        sample_rate: Poisson sampling rate with secret coins (``client-sampling = poisson``):
            the accounting is amplified and charges every client every round; 0: a fixed-size
            cohort, no amplification, each client charged for its own rounds.
    """

    mechanism: ClientDP
    noise_multiplier: float
    update_noise: float
    count_noise: float
    clip: float
    cohort: int
    horizon: int
    bands: int
    participations: int
    separation: int
    worst_sensitivity: float
    sample_rate: float = 0.0

    @property
    def correlation(self) -> Correlation:
        """How the noise of successive rounds is correlated."""
        return self.mechanism.correlation


def plan_client_dp(settings: RunSettings, *, population: int) -> ClientLevelPlan | None:
    """The run's client-level plan, or ``None`` without client-level DP.

    Raises:
        ConfigError: The target epsilon cannot be reached, or the count noise of
            ``server-adaptive`` is too small for the noise asked for.
    """
    mechanism = settings.client_dp
    if mechanism == ClientDP.NONE:
        return None
    cohort = settings.sample_size(population)
    if settings.strategy == StrategyName.FEDBUFF:  # each release sums one buffer
        cohort = settings.buffer_size
    horizon = settings.num_server_rounds
    bands = 1
    if mechanism == ClientDP.FTRL_BANDED:
        bands = settings.client_dp_bands or max(1, population // cohort)
        bands = min(bands, horizon)
    separation = bands
    participations = settings.max_participations()
    if mechanism == ClientDP.FTRL_BANDED:
        participations = min(participations, -(-horizon // bands))
    worst = worst_sensitivity(
        mechanism.correlation, horizon=horizon, participations=participations, bands=bands
    )
    rate = 0.0
    if settings.client_sampling == ClientSampling.POISSON:
        rate = settings.fraction_train
        cohort = max(1, round(rate * population))
        participations, worst = horizon, 1.0
    target = settings.client_target_epsilon()
    if target > 0:
        noise = calibrate_noise(
            target, delta=settings.target_delta, worst=worst, sample_rate=rate, rounds=horizon
        )
    else:
        noise = settings.client_dp_noise
    update_noise, count_noise = noise, 0.0
    if mechanism == ClientDP.SERVER_ADAPTIVE:
        count_noise = settings.client_dp_count_noise or cohort / 20
        if noise >= 2 * count_noise:
            raise ConfigError(
                f"client-dp='server-adaptive': the noise multiplier {noise:.4g} needs a "
                f"clipped-count noise above {noise / 2:.4g} (client-dp-count-noise is "
                f"{count_noise:.4g}); raise client-dp-count-noise or sample more clients"
            )
        update_noise = (noise**-2 - (2 * count_noise) ** -2) ** -0.5
    return ClientLevelPlan(
        mechanism=mechanism,
        noise_multiplier=noise,
        update_noise=update_noise,
        count_noise=count_noise,
        clip=settings.client_dp_clip,
        cohort=cohort,
        horizon=horizon,
        bands=bands,
        participations=participations,
        separation=separation,
        worst_sensitivity=worst,
        sample_rate=rate,
    )


class ClientLevelDP(Strategy):
    """Clip, sum, noise (see the module docstring) around ``strategy``."""

    def __init__(
        self,
        strategy: Strategy,
        plan: ClientLevelPlan,
        *,
        weight_key: str,
        quantile: float = 0.5,
        clip_lr: float = 0.2,
        reproducible_seed: int | None = None,
    ) -> None:
        self.strategy = strategy
        self.plan = plan
        self.noise_multiplier = plan.noise_multiplier
        self.clipping_norm = plan.clip
        self.weight_key = weight_key
        self.quantile = quantile
        self.clip_lr = clip_lr
        self.reproducible_seed = reproducible_seed
        self.stream = NoiseStream(plan.correlation, bands=plan.bands)
        self.current_arrays: ArrayRecord | None = None
        self.last_clip = plan.clip
        self.released_round = 0  # the last round whose noised mean was handed on

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        if self.plan.mechanism == ClientDP.CLIENT_FIXED:
            config[KEY_CLIPPING_NORM] = self.clipping_norm
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies or self.current_arrays is None:
            return None, None
        keys = list(self.current_arrays.keys())
        current = [np.asarray(self.current_arrays[k].numpy(), dtype=np.float64) for k in keys]
        total, within = _clipped_sum(replies, keys, current, self.clipping_norm)
        std = self.update_noise * self.clipping_norm
        shapes = [c.shape for c in current]
        noise = self.stream.next(server_round, shapes, std, self._source(server_round))
        out = ArrayRecord()
        for key, c, acc, z in zip(keys, current, total, noise, strict=True):
            dtype = self.current_arrays[key].numpy().dtype
            out[key] = Array(np.asarray(c + (acc + z) / self.plan.cohort, dtype=dtype))
        logger.info(
            "client-level DP (%s): %d updates clipped to %.4g, noise std %.4g on the sum",
            self.plan.mechanism.value, len(replies), self.clipping_norm, std,
        )  # fmt: skip
        self.last_clip = self.clipping_norm
        self.released_round = server_round
        if self.plan.mechanism == ClientDP.SERVER_ADAPTIVE:
            self._adapt(within, len(replies), server_round)
        summary = Message(
            RecordDict({"arrays": out, "metrics": MetricRecord({self.weight_key: 1})}),
            dst_node_id=0,
            message_type="train",
        )
        new_arrays, _ = self.strategy.aggregate_train(
            server_round, [Message(summary.content, reply_to=summary)]
        )
        metrics = weighted_metrics([m.content for m in replies], self.weight_key)
        return new_arrays, metrics

    @property
    def update_noise(self) -> float:
        """The noise multiplier added to the update: ``noise_multiplier``, or under adaptive
        clipping what is left of it once the count's noise is counted."""
        if self.plan.count_noise > 0:
            return float((self.noise_multiplier**-2 - (2 * self.plan.count_noise) ** -2) ** -0.5)
        return self.noise_multiplier

    def _source(self, server_round: int, stream: int = 0) -> NoiseSource:
        if self.reproducible_seed is not None:
            return NoiseSource.for_tests(self.reproducible_seed, server_round, stream)
        return NoiseSource.secure()

    def _adapt(self, within: int, replies: int, server_round: int) -> None:
        """Geometric clip update towards the target quantile from the noised count of
        ``bit - 1/2`` over the planned cohort (the exact number of replies is not used)."""
        generator = self._source(server_round, 1).generator(step=0)
        noise = float(gaussian((1,), self.plan.count_noise, generator, dtype=torch.float64)[0])
        share = (within - replies / 2 + noise) / self.plan.cohort + 0.5
        self.clipping_norm *= math.exp(-self.clip_lr * (share - self.quantile))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        logger.info(
            "client-level DP %s (noise multiplier %.4g, clip %.4g) around %s",
            self.plan.mechanism.value, self.noise_multiplier, self.clipping_norm, self.strategy,
        )  # fmt: skip
        self.strategy.summary()

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, np.ndarray]:
        """The noise stream's kept draws and the current clip, as named arrays."""
        out = {f"stream.{k}": v for k, v in self.stream.state().items()}
        out["clip"] = np.asarray(self.clipping_norm)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state`."""
        if "clip" in state:
            self.clipping_norm = float(np.asarray(state["clip"]).reshape(-1)[0])
        self.stream.load_state(
            {k.removeprefix("stream."): v for k, v in state.items() if k.startswith("stream.")}
        )


def _clipped_sum(
    replies: list[Message], keys: list[str], current: list[np.ndarray], clip: float
) -> tuple[list[np.ndarray], int]:
    """The sum of the replies' updates (reply minus ``current``), each scaled to L2 norm at
    most ``clip`` over all tensors, in float64, per tensor of ``keys``; and how many were
    within the clip already. Matrices of flat updates (at most :data:`_SUM_CHUNK_BYTES` each,
    whatever the model and cohort), not a loop per reply and tensor."""
    base = np.concatenate([c.ravel() for c in current])
    flat = np.zeros(base.size)
    within = 0
    width = max(1, _SUM_CHUNK_BYTES // (8 * base.size))
    for start in range(0, len(replies), width):
        chunk = replies[start : start + width]
        rows = np.empty((len(chunk), base.size))
        for row, reply in zip(rows, chunk, strict=True):
            record = records_of(reply.content, ArrayRecord)[0][1]  # the one (validated)
            np.concatenate([np.asarray(record[k].numpy()).ravel() for k in keys], out=row)
        rows -= base
        # einsum, not BLAS: its thread pool fights torch's on few cores (as in validation)
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        over = norms > clip  # a NaN norm is not over: summed unscaled, it poisons the sum
        scales = np.ones(len(chunk))
        scales[over] = clip / norms[over]
        flat += np.einsum("i,ij->j", scales, rows)
        within += int(np.sum(norms <= clip))
    parts = np.split(flat, np.cumsum([c.size for c in current])[:-1])
    return [part.reshape(c.shape) for part, c in zip(parts, current, strict=True)], within


#: the most memory one matrix of flat updates may take in :func:`_clipped_sum` (a cohort of
#: 1000 updates of the 1.27 M-parameter resnet would otherwise take 10 GB)
_SUM_CHUNK_BYTES = 64 << 20


def account(
    plan: ClientLevelPlan,
    history: dict[str, list[int]],
    *,
    noise: float,
    delta: float,
    releases: int = 0,
) -> tuple[float | None, Epsilons]:
    """The worst-placed client's sensitivity and epsilon over ``history`` (client -> rounds)
    under noise multiplier ``noise``; under Poisson sampling every client's, over ``releases``
    amplified rounds (no sensitivity: ``None``)."""
    if plan.sample_rate > 0:
        return None, amplified_epsilons(noise, plan.sample_rate, releases, delta)
    worst = max(
        (sensitivity(plan.correlation, r, horizon=plan.horizon, bands=plan.bands)
         for r in history.values()),
        default=0.0,
    )  # fmt: skip
    if worst == 0:
        return 0.0, Epsilons(rdp=0.0, pld=0.0)
    return worst, gaussian_epsilons(noise / worst, delta)


def eligibility(
    plan: ClientLevelPlan,
    history: dict[str, list[int]],
    rnd: int,
    *,
    noise: float,
    delta: float,
    budget: float,
) -> Callable[[str], bool] | None:
    """Which clients round ``rnd`` may sample: fewer than ``participations`` contributions,
    the last at least ``separation`` rounds ago, and (``budget`` > 0) an epsilon within the
    budget after this round. ``None``: every client may."""
    limited = plan.participations < plan.horizon or plan.separation > 1 or budget > 0
    if not limited:
        return None
    if plan.sample_rate > 0:  # every client is charged the same: all or none may go on
        spent = amplified_epsilons(noise, plan.sample_rate, rnd, delta).epsilon
        return lambda client: spent <= budget
    # epsilon grows with the sensitivity: the budget is a largest sensitivity, found once
    most = noise / calibrate_noise(budget, delta=delta, worst=1.0) if budget > 0 else math.inf

    def allowed(client: str) -> bool:
        rounds = history.get(client, [])
        if len(rounds) >= plan.participations:
            return False
        if rounds and rnd - rounds[-1] < plan.separation:
            return False
        if budget <= 0:
            return True
        after = sensitivity(
            plan.correlation, [*rounds, rnd], horizon=plan.horizon, bands=plan.bands
        )
        return after <= most

    return allowed
