"""The typed form of the ConfigRecord the server sends with each train/evaluate message."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pollinate.errors import ConfigError

__all__ = ["ClientTask"]


def _num(cfg: Mapping[str, object], key: str, default: float | None = None) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"train config: {key!r} must be a number, got {value!r}")
    return float(value)


def _int(cfg: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = _num(cfg, key, default)
    if not value.is_integer():
        raise ConfigError(f"train config: {key!r} must be an integer, got {value!r}")
    return int(value)


def _str(cfg: Mapping[str, object], key: str, default: str | None = None) -> str:
    value = cfg.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"train config: {key!r} must be text, got {value!r}")
    return value


@dataclass(frozen=True)
class ClientTask:
    """What the server asks a client to do this round."""

    server_round: int
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    test_fraction: float
    partitioner: str
    num_partitions: int
    dirichlet_alpha: float
    shards_per_client: int
    samples_per_client: int
    seed: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    dp: bool
    noise_multiplier: float
    max_grad_norm: float
    target_delta: float
    epsilon_budget: float
    proximal_mu: float
    client_state_dir: str
    reproducible_noise: bool = False
    local_eval_fraction: float = 0.0
    eval_noise_multiplier: float = 5.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> ClientTask:
        """Parse and check the server's ConfigRecord."""
        shape = cfg.get("input-shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ConfigError(f"train config: 'input-shape' must be a list of ints, got {shape!r}")
        return cls(
            server_round=_int(cfg, "server-round", 0),
            model=_str(cfg, "model"),
            input_shape=tuple(int(d) for d in shape),
            num_classes=_int(cfg, "num-classes"),
            dataset=_str(cfg, "dataset"),
            test_fraction=_num(cfg, "test-fraction"),
            partitioner=_str(cfg, "partitioner"),
            num_partitions=_int(cfg, "num-partitions"),
            dirichlet_alpha=_num(cfg, "dirichlet-alpha"),
            shards_per_client=_int(cfg, "shards-per-client"),
            samples_per_client=_int(cfg, "samples-per-client", 0),
            seed=_int(cfg, "seed"),
            local_epochs=_int(cfg, "local-epochs"),
            batch_size=_int(cfg, "batch-size"),
            learning_rate=_num(cfg, "learning-rate"),
            momentum=_num(cfg, "momentum", 0.0),
            dp=_str(cfg, "dp") == "sample",
            noise_multiplier=_num(cfg, "noise-multiplier"),
            max_grad_norm=_num(cfg, "max-grad-norm"),
            target_delta=_num(cfg, "target-delta"),
            epsilon_budget=_num(cfg, "epsilon-budget", 0.0),
            proximal_mu=_num(cfg, "proximal-mu", 0.0),
            client_state_dir=_str(cfg, "client-state-dir", ""),
            reproducible_noise=bool(cfg.get("reproducible-noise", False)),
            local_eval_fraction=_num(cfg, "local-eval-fraction", 0.0),
            eval_noise_multiplier=_num(cfg, "eval-noise-multiplier", 5.0),
        )
