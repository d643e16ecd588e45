"""One typed settings object for a run, built from Flower's run config (or CLI flags).

Keys use Flower's kebab-case (``num-server-rounds``); every value is checked here, once, so
a mistyped setting fails before any process starts, with a message naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate._tracing import TracingSettings
from pollinate.config._checks import check_buffered, check_client_dp
from pollinate.config.values import (
    EXPORT_FORMATS,
    ClientDP,
    ClientSampling,
    RobustAggregation,
    SampleDP,
    StalenessWeighting,
    StrategyName,
    coerce,
    enum_value,
    non_negative_float,
    positive_float,
    positive_int,
)
from pollinate.errors import ConfigError
from pollinate.tasks import Task, TaskKind

if TYPE_CHECKING:
    from pollinate.data import DatasetSplit

__all__ = ["RunSettings", "bundle_dir"]


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs. Field names are the snake_case form of the run-config keys."""

    num_server_rounds: int = 5
    fraction_train: float = 0.1
    client_sampling: ClientSampling = ClientSampling.FIXED
    min_train_nodes: int = 2
    min_replies: int = 1
    min_available_nodes: int = 0
    fraction_evaluate: float = 0.0
    round_timeout: float = 600.0
    strategy: StrategyName = StrategyName.FEDAVG
    buffer_size: int = 10  # fedbuff: replies per server update
    max_staleness: int = 10  # fedbuff: updates from a model more versions old are dropped
    staleness_weighting: StalenessWeighting = StalenessWeighting.POLYNOMIAL
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.0
    server_momentum: float = 0.9
    robust: RobustAggregation = RobustAggregation.NONE
    num_malicious: int = 1
    trim_beta: float = 0.1
    model: str = "cnn"
    fix_model: bool = False
    task: TaskKind = TaskKind.AUTO
    loss: str = ""
    metrics: str = ""
    dataset: str = "mnist"
    test_fraction: float = 0.2
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    samples_per_client: int = 0
    seed: int = 42
    local_epochs: int = 1
    batch_size: int = 32
    physical_batch_size: int = 0
    learning_rate: float = 0.5
    momentum: float = 0.0
    dp: SampleDP = SampleDP.DPSGD
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_delta: float = 1e-5
    target_epsilon: float = 0.0
    participation_bound: int = 0
    epsilon_budget: float = 0.0
    client_dp: ClientDP = ClientDP.NONE
    client_dp_noise: float = 1.0
    client_dp_clip: float = 1.0
    client_dp_budget: float = 0.0
    client_dp_target_epsilon: float = 0.0
    client_dp_quantile: float = 0.5
    client_dp_clip_lr: float = 0.2
    client_dp_count_noise: float = 0.0
    client_dp_bands: int = 0
    secure_aggregation: bool = False
    secagg_share_fraction: float = 1.0
    secagg_threshold_fraction: float = 0.6
    secagg_clipping_range: float = 8.0
    secagg_max_weight: float = 0.0
    max_update_norm: float = 0.0
    run_dir: str = ""
    resume: bool = False
    keep_checkpoints: int = 3
    export_dir: str = ""
    export_formats: str = "onnx,openvino"
    export_sign_key: str = ""
    export_triton_repo: str = ""
    deliver_bundle: bool = True
    local_eval_fraction: float = 0.2
    eval_noise_multiplier: float = 5.0
    reproducible_noise: bool = False
    trace_endpoint: str = ""  # OTLP/HTTP collector of the rounds' spans; empty: no tracing
    tracking_uri: str = ""  # MLflow (pollinate.rundir.tracking); empty: not tracked
    # the fast engine's latency model (simulation.latency); latency-median-s = 0: replies at once
    latency_median_s: float = 0.0
    latency_sigma: float = 0.5
    slow_fraction: float = 0.0
    slow_factor: float = 10.0
    dropout: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Build settings from a Flower run config; unknown keys are an error."""
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            fld = known.get(key)
            if fld is None:
                close = [k for k in known if k.split("-")[0] == key.split("-")[0]]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"unknown setting {key!r}{hint}; see `pollinate simulate --help`")
            values[fld.name] = coerce(key, fld, raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with some fields changed, validated."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The Flower run-config form (kebab-case keys, plain values)."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = value.value if isinstance(value, Enum) else value
        return out

    def learning_task(self, data: DatasetSplit) -> Task:
        """The task of this run on ``data``: the kind the data was loaded as (given, or
        detected from its labels) with this run's loss and metrics hooks."""
        task = dataclasses.replace(data.task, loss=self.loss, metrics=self.metrics)
        if (
            task.kind == TaskKind.REGRESSION
            and self.fraction_evaluate > 0
            and self.dp == SampleDP.DPSGD
        ):
            raise ConfigError(
                "federated evaluation (fraction-evaluate > 0) of a regression task under "
                "DP-SGD is not supported: a client's squared error has no bound to noise it "
                "by; set fraction-evaluate = 0 (central evaluation still runs)"
            )
        return task

    def bundle_dir(self, run_dir: Path) -> Path | None:
        """Where the end-of-run export goes (see :func:`bundle_dir`)."""
        return bundle_dir(run_dir, self.export_dir, self.export_triton_repo)

    # ---------------------------------------------------------------- checking
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        positive_int("num-server-rounds", self.num_server_rounds)
        positive_int("min-train-nodes", self.min_train_nodes)
        positive_int("min-replies", self.min_replies)
        positive_int("local-epochs", self.local_epochs)
        positive_int("batch-size", self.batch_size)
        positive_int("shards-per-client", self.shards_per_client)
        if self.samples_per_client < 0:
            raise ConfigError(
                f"setting 'samples-per-client' must be >= 0 (0 = training set / clients), "
                f"got {self.samples_per_client}"
            )
        positive_int("keep-checkpoints", self.keep_checkpoints)
        if self.trace_endpoint:
            TracingSettings(endpoint=self.trace_endpoint)  # raises ConfigError naming it
        formats = [f.strip() for f in self.export_formats.split(",") if f.strip()]
        unknown = [f for f in formats if f not in EXPORT_FORMATS]
        if not formats or unknown:
            raise ConfigError(
                f"setting 'export-formats' {self.export_formats!r} must list formats from "
                f'{", ".join(EXPORT_FORMATS)}, comma-separated (e.g. "onnx,openvino")'
            )
        if self.export_triton_repo and "onnx" not in formats:
            raise ConfigError(
                "setting 'export-triton-repo' publishes the exported ONNX model: it needs "
                f"'onnx' in 'export-formats' (got {self.export_formats!r})"
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(
                f"setting 'fraction-train' must be in (0, 1], got {self.fraction_train}; "
                "0.1 samples 10% of the clients each round"
            )
        if not 0.0 < self.local_eval_fraction < 1.0:
            raise ConfigError(
                f"setting 'local-eval-fraction' must be in (0, 1), got "
                f"{self.local_eval_fraction}; 0.2 holds out a fifth of each client's data for "
                "federated evaluation"
            )
        if not self.eval_noise_multiplier > 0:
            raise ConfigError(
                f"setting 'eval-noise-multiplier' must be > 0, got {self.eval_noise_multiplier}"
            )
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(
                f"setting 'fraction-evaluate' must be in [0, 1], got {self.fraction_evaluate}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(
                f"setting 'test-fraction' must be in (0, 1), got {self.test_fraction}"
            )
        for key, value in (
            ("learning-rate", self.learning_rate),
            ("max-grad-norm", self.max_grad_norm),
            ("dirichlet-alpha", self.dirichlet_alpha),
            ("round-timeout", self.round_timeout),
            ("client-dp-clip", self.client_dp_clip),
        ):
            positive_float(key, value)
        for key, value in (
            ("noise-multiplier", self.noise_multiplier),
            ("proximal-mu", self.proximal_mu),
            ("server-learning-rate", self.server_learning_rate),
            ("momentum", self.momentum),
            ("target-epsilon", self.target_epsilon),
            ("epsilon-budget", self.epsilon_budget),
            ("client-dp-noise", self.client_dp_noise),
            ("client-dp-budget", self.client_dp_budget),
            ("client-dp-target-epsilon", self.client_dp_target_epsilon),
            ("max-update-norm", self.max_update_norm),
        ):
            non_negative_float(key, value)
        for key, value in (
            ("secagg-share-fraction", self.secagg_share_fraction),
            ("secagg-threshold-fraction", self.secagg_threshold_fraction),
        ):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"setting {key!r} must be in (0, 1], got {value}")
        positive_float("secagg-clipping-range", self.secagg_clipping_range)
        non_negative_float("secagg-max-weight", self.secagg_max_weight)
        if self.secure_aggregation and self.client_dp.server_clips:
            raise ConfigError(
                f"secure-aggregation with client-dp={self.client_dp.value!r}: the server cannot "
                "clip updates it never sees; use client-dp='client-fixed' (clients clip, the "
                "server adds the noise to the sum)"
            )
        check_client_dp(self)
        check_buffered(self)
        if self.secure_aggregation and self.robust != RobustAggregation.NONE:
            raise ConfigError(
                f"secure-aggregation with robust={self.robust.value!r}: robust aggregators "
                "need each client's update, which secure aggregation hides; set robust='none'"
            )
        if not 0.0 < self.target_delta < 1.0:
            raise ConfigError(
                f"setting 'target-delta' must be in (0, 1), got {self.target_delta}; "
                "use about 1/(number of samples), e.g. 1e-5"
            )
        if self.dp == SampleDP.DPSGD and self.noise_multiplier == 0 and self.target_epsilon == 0:
            raise ConfigError(
                "setting 'noise-multiplier' is 0 with dp='sample': DP-SGD without noise gives no "
                "privacy; set a noise multiplier (e.g. 1.0), a 'target-epsilon', or dp='none'"
            )
        if self.client_dp != ClientDP.NONE and self.client_dp_noise == 0:
            raise ConfigError(
                "setting 'client-dp-noise' must be positive when client-dp is enabled"
            )
        if self.min_available_nodes < 0:
            raise ConfigError("setting 'min-available-nodes' must be >= 0")
        if self.physical_batch_size < 0:
            raise ConfigError(
                f"setting 'physical-batch-size' must be >= 0 (0: the whole batch at once), "
                f"got {self.physical_batch_size}"
            )
        if self.participation_bound < 0:
            raise ConfigError("setting 'participation-bound' must be >= 0 (0 means every round)")
        if self.robust == RobustAggregation.TRIMMED_MEAN and not 0.0 < self.trim_beta < 0.5:
            raise ConfigError(f"setting 'trim-beta' must be in (0, 0.5), got {self.trim_beta}")
        if self.robust == RobustAggregation.KRUM and self.num_malicious < 0:
            raise ConfigError("setting 'num-malicious' must be >= 0")
        from pollinate.models import MODELS, is_import_path

        if not is_import_path(self.model) and self.model not in MODELS:
            raise ConfigError(
                f"setting 'model': unknown model {self.model!r}; choose one of: "
                + ", ".join(sorted(MODELS))
                + ", or give an import path such as 'mypackage.models:Net'"
            )
        from pollinate.data import Partitioner

        enum_value(Partitioner, "partitioner", self.partitioner)
        for key, spec in (("loss", self.loss), ("metrics", self.metrics)):
            if spec and not is_import_path(spec):
                raise ConfigError(
                    f"setting {key!r} {spec!r} is not an import path; write it as "
                    "'package.module:function' (or leave it empty for the task's own)"
                )

    def client_target_epsilon(self) -> float:
        """The client-level target epsilon: ``client-dp-target-epsilon``, or ``target-epsilon``
        when it is the only DP in the run (``dp = none``); 0 when the noise is given."""
        if self.client_dp_target_epsilon > 0 or self.client_dp == ClientDP.NONE:
            return self.client_dp_target_epsilon
        return self.target_epsilon if self.dp == SampleDP.NONE else 0.0

    # ------------------------------------------------------------- derived
    def server_lr(self) -> float:
        """``server-learning-rate``, or (0) the strategy's default: 1.0 for FedAvgM and
        FedBuff (the mean update, plus momentum for FedAvgM), 0.01 for FedAdam and FedYogi."""
        if self.server_learning_rate > 0:
            return self.server_learning_rate
        return 1.0 if self.strategy in (StrategyName.FEDAVGM, StrategyName.FEDBUFF) else 0.01

    def sample_size(self, population: int) -> int:
        """Clients sampled per round from ``population`` connected nodes."""
        return min(population, max(self.min_train_nodes, int(population * self.fraction_train)))

    def max_participations(self) -> int:
        """Rounds a client may train in when noise is calibrated to a target epsilon."""
        if self.participation_bound == 0:
            return self.num_server_rounds
        return min(self.participation_bound, self.num_server_rounds)

    def evaluate_size(self, population: int) -> int:
        """Clients asked for federated evaluation per round (0 disables it)."""
        if self.fraction_evaluate == 0.0:
            return 0
        return min(population, max(1, int(population * self.fraction_evaluate)))


def bundle_dir(run_dir: Path, export_dir: str, export_triton_repo: str) -> Path | None:
    """Where a run's end-of-run export goes: ``export-dir``, else ``RUN_DIR/bundle`` when
    ``export-triton-repo`` asks for one; None when the run exports nothing."""
    if export_dir:
        return Path(export_dir)
    return Path(run_dir) / "bundle" if export_triton_repo else None
