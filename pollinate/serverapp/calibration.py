"""What the server derives from the settings and the data before the first round.

The DP-SGD noise multiplier (as given, or calibrated to ``target-epsilon`` for the worst
client), the task config every ClientApp receives, the L2 bound above which an update is
rejected as malformed, and the largest client weight secure aggregation scales by. All are
pure functions of the settings, the server's copy of the data and the population.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord

from pollinate.clientapp.training import dp_plan
from pollinate.config import RunSettings, SampleDP
from pollinate.data import DatasetSplit
from pollinate.errors import PollinateError
from pollinate.protocol import UNIFORM_WEIGHT_KEY
from pollinate.serverapp.strategy import weight_key_for

__all__ = [
    "client_config",
    "local_eval_fraction",
    "resolve_noise",
    "secagg_max_weight",
    "update_bound",
]


def resolve_noise(settings: RunSettings, data: DatasetSplit, population: int) -> float:
    """The DP-SGD noise multiplier: as given, or calibrated to ``target-epsilon``.

    Calibration is for the worst client: the noise is the largest any partition size needs
    (its sample rate and steps) to stay within the target over ``participation-bound`` rounds
    (every round by default). The target is also each client's budget, so a client that would
    go past it declines instead.
    """
    if settings.dp != SampleDP.DPSGD or settings.target_epsilon == 0:
        return settings.noise_multiplier
    from pollinate.privacy import noise_multiplier_for_budget

    rounds = settings.local_epochs * settings.max_participations()
    plans = {dp_plan(n, settings.batch_size) for n in _train_sizes(settings, data, population)}
    return max(
        noise_multiplier_for_budget(
            target_epsilon=settings.target_epsilon,
            delta=settings.target_delta,
            sample_rate=rate,
            steps=per_epoch * rounds,
        )
        for rate, per_epoch in sorted(plans)
    )


def _train_sizes(settings: RunSettings, data: DatasetSplit, population: int) -> list[int]:
    """How many samples each client trains on (after its held-out split), as far as the server
    can know: the partitions of its own data set, or the average where they cannot be made."""
    from pollinate.data import partition_sizes

    try:
        if data.partitions is not None:  # the user's loader made the shares
            sizes = {len(p) for p in data.partitions}
        else:
            sizes = partition_sizes(
                data.train.y, population, settings.partitioner, seed=settings.seed,
                alpha=settings.dirichlet_alpha, shards_per_partition=settings.shards_per_client,
                samples_per_partition=settings.samples_per_client,
            )  # fmt: skip
    except (PollinateError, ValueError):
        sizes = {max(1, len(data.train) // population)}
    fraction = local_eval_fraction(settings)
    return [n - (math.floor(n * fraction) if n >= 2 else 0) for n in sorted(sizes)]


def local_eval_fraction(settings: RunSettings) -> float:
    """The share of each client's data held out for federated evaluation (0 without it)."""
    return settings.local_eval_fraction if settings.fraction_evaluate > 0 else 0.0


def client_config(
    settings: RunSettings, data: DatasetSplit, *, population: int, noise: float, run_dir: Path
) -> ConfigRecord:
    """Everything a ClientApp needs, sent with every train/evaluate message."""
    budget = settings.epsilon_budget
    if budget == 0 and settings.target_epsilon > 0:
        budget = settings.target_epsilon
    return ConfigRecord(
        {
            "model": settings.model,
            "fix-model": settings.fix_model,
            "input-shape": [int(d) for d in data.input_shape],
            "num-classes": int(data.num_classes),
            "task": data.task.kind.value,
            "loss": settings.loss,
            "dataset": settings.dataset,
            "test-fraction": settings.test_fraction,
            "partitioner": settings.partitioner,
            "num-partitions": population,
            "dirichlet-alpha": settings.dirichlet_alpha,
            "shards-per-client": settings.shards_per_client,
            "samples-per-client": settings.samples_per_client,
            "seed": settings.seed,
            "local-epochs": settings.local_epochs,
            "batch-size": settings.batch_size,
            "physical-batch-size": settings.physical_batch_size,
            "learning-rate": settings.learning_rate,
            "momentum": settings.momentum,
            "dp": settings.dp.value,
            "noise-multiplier": noise,
            "max-grad-norm": settings.max_grad_norm,
            "target-delta": settings.target_delta,
            "epsilon-budget": budget,
            "client-state-dir": str(run_dir / "clients"),
            "local-eval-fraction": local_eval_fraction(settings),
            "eval-noise-multiplier": settings.eval_noise_multiplier,
            "reproducible-noise": settings.reproducible_noise,
        }
    )


def update_bound(
    settings: RunSettings, arrays: dict[str, np.ndarray], *, mean_samples: float, noise: float
) -> float:
    """The L2 bound above which an update is rejected as malformed.

    ``max-update-norm`` when set. Otherwise 100, plus with DP-SGD five times the norm that
    the DP noise alone gives an honest update of an average client (noise std
    ``lr * sigma * C / B`` per coordinate and step, a random walk over its local steps,
    amplified by momentum): honest noisy updates pass, NaN, scaled or broken ones do not.
    """
    if settings.max_update_norm > 0:
        return settings.max_update_norm
    bound = 100.0
    if settings.dp == SampleDP.DPSGD:
        dims = sum(int(v.size) for v in arrays.values())
        batch = max(1.0, min(float(settings.batch_size), mean_samples))
        steps = settings.local_epochs * max(1, math.ceil(mean_samples / settings.batch_size))
        per_step = settings.learning_rate * noise * settings.max_grad_norm * math.sqrt(dims) / batch
        bound += 5.0 * per_step * math.sqrt(steps) / max(1e-6, 1.0 - settings.momentum)
    return bound


def secagg_max_weight(settings: RunSettings, data: DatasetSplit, population: int) -> float:
    """The largest client weight secure aggregation scales by: ``secagg-max-weight``, else 1
    for equal weights, else four times the average client's sample count (at least 1)."""
    if settings.secagg_max_weight:
        return settings.secagg_max_weight
    if weight_key_for(settings) == UNIFORM_WEIGHT_KEY:
        return 1.0
    return max(1.0, 4.0 * len(data.train) / population)
