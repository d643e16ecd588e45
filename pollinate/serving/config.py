"""Typed settings of ``pollinate serve``, from flags and/or a TOML file.

The file has the same names as the flags, grouped in tables; a flag given on the command
line wins over the file::

    [server]
    repository = "models"          # the Triton-layout model repository
    host = "0.0.0.0"
    http-port = 8000
    grpc-port = 8001
    metrics-port = 8002
    device = "auto"                # auto | cpu | cuda
    backend = "auto"               # auto | onnxruntime | torch
    instances = 1                  # model instances (sessions) per version
    threads = 1                    # intra-op threads per instance
    workers = 1                    # server processes sharing the ports (see --workers)

    [batching]
    max-batch-size = 64
    max-queue-delay-us = 500
    max-queue-size = 512           # samples waiting per version; beyond it: 503 at once
                                   # (0: no queue; admitted only while an instance is free)
    request-timeout-s = 5.0

    [rollout]
    canary-percent = 10.0
    min-requests = 200
    max-error-increase = 0.01
    max-latency-ratio = 1.5
    poll-interval-s = 2.0

    [drift]
    threshold = 0.2
    window = 1000
    trigger-dir = "triggers"
    webhook = "https://example.org/retrain"

    [security]
    token-file = "token.txt"       # bearer token; health endpoints stay open
    tls-cert = "server.pem"
    tls-key = "server.key"
    max-request-bytes = 16777216

    [ab]                           # A/B/n experiments (the workers share the records)
    state-dir = "ab-state"         # NAME.sqlite (answers, outcomes) + NAME.json per experiment
    memory = 100000                # recent request ids remembered for feedback
    user-header = "x-user-id"      # the same user always gets the same variant

    [ab.new-cnn]                   # one experiment: its name salts the user hash
    model = "cnn"                  # splits requests to /v2/models/cnn/infer (no version)
    metric = "accuracy"            # accuracy (feedback: label) | reward (feedback: reward)
    variants = [                   # 2 to 5; the first is the control; weights sum to 1
      { name = "control", version = 3, weight = 0.5 },
      { name = "v4", version = 4, weight = 0.25 },       # model: the experiment's by default
      { name = "small", model = "cnn-small", weight = 0.25 },   # no version: its current one
    ]
    alpha = 0.05                   # family-wise error rate (Holm over the challengers)
    margin = 0.01                  # "no difference" once the interval is inside +-margin
    mixture-sd = 0.02              # the effect the always-valid test detects fastest
    min-samples = 100              # outcomes per arm before the first look

    [tracing]                      # OpenTelemetry; off unless an endpoint is given
    endpoint = "http://localhost:4318"   # OTLP/HTTP collector ("env": OTEL_EXPORTER_OTLP_*)
    sample-rate = 0.01             # share of requests traced (a sampled traceparent always is)
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args

from pollinate._tracing import TracingSettings
from pollinate.errors import ConfigError
from pollinate.serving.ab_config import ABSettings, ab_settings_from_dict, parse_ab_table
from pollinate.serving.backends import BackendName, Device
from pollinate.serving.drift import DriftSettings

__all__ = [
    "BatchingSettings",
    "RolloutSettings",
    "ServeSettings",
    "load_serve_settings",
    "settings_from_json",
    "settings_to_json",
]


@dataclass(frozen=True)
class BatchingSettings:
    """Dynamic batching, per model version (``config.pbtxt`` may override delay/instances)."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 0  # Triton's default: batch what queued while busy
    max_queue_size: int = 512
    request_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _positive("max-batch-size", self.max_batch_size)
        if self.max_queue_size < 0:
            raise ConfigError(
                f"max-queue-size must be >= 0 (0: no queue), got {self.max_queue_size}"
            )
        _positive("request-timeout-s", self.request_timeout_s)
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        if 0 < self.max_queue_size < self.max_batch_size:
            raise ConfigError(
                f"max-queue-size ({self.max_queue_size}) must be at least max-batch-size "
                f"({self.max_batch_size}), or no full batch could ever queue"
            )


@dataclass(frozen=True)
class RolloutSettings:
    """How a new version goes from canary to current (or back out)."""

    canary_percent: float = 10.0
    min_requests: int = 200
    max_error_increase: float = 0.01
    max_latency_ratio: float = 1.5
    poll_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.canary_percent <= 100.0:
            raise ConfigError(f"canary-percent must be in (0, 100], got {self.canary_percent}")
        _positive("min-requests", self.min_requests)
        _positive("max-latency-ratio", self.max_latency_ratio)
        _positive("poll-interval-s", self.poll_interval_s)
        if not 0.0 <= self.max_error_increase <= 1.0:
            raise ConfigError(
                f"max-error-increase must be in [0, 1], got {self.max_error_increase}"
            )


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``pollinate serve`` needs."""

    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    device: Device = "auto"
    backend: BackendName = "auto"
    instances: int = 1
    threads: int = 1
    workers: int = 1
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    ab: ABSettings = field(default_factory=ABSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    port_file: Path | None = None
    access_log: bool = False

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name.replace('_', '-')} must be 0..65535, got {port}")
        if self.device not in get_args(Device):
            raise ConfigError(f"device must be one of auto, cpu, cuda; got {self.device!r}")
        if self.backend not in get_args(BackendName):
            raise ConfigError(
                f"backend must be one of auto, onnxruntime, torch; got {self.backend!r}"
            )
        _positive("instances", self.instances)
        _positive("threads", self.threads)
        _positive("workers", self.workers)
        _positive("max-request-bytes", self.max_request_bytes)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("the bearer token must be at least 16 characters long")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


_TABLES = {
    "batching": BatchingSettings,
    "rollout": RolloutSettings,
    "drift": DriftSettings,
    "tracing": TracingSettings,
}
_PATHS = {"repository", "tls_cert", "tls_key", "port_file", "trigger_dir"}


def _convert(cls: type, table: str, raw: dict[str, Any], base: Path) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            valid = ", ".join(sorted(n.replace("_", "-") for n in known))
            raise ConfigError(f"[{table}] has an unknown key {key!r}; valid keys: {valid}")
        if name in _PATHS and value is not None:
            value = (base / str(value)).resolve()
        out[name] = value
    return out


def load_serve_settings(config_file: Path | None, overrides: dict[str, Any]) -> ServeSettings:
    """Settings from ``config_file`` (TOML) with ``overrides`` (flags that were given) on top.

    ``overrides`` keys are field names; ``batching.``, ``rollout.``, ``drift.`` and ``tracing.``
    prefixes
    address the nested tables (``"batching.max_batch_size"``). Relative paths in the file
    are relative to the file.
    """
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in _TABLES}
    if config_file is not None:
        try:
            raw = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"cannot read config file {config_file}: {err.strerror}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {config_file} is not valid TOML: {err}") from err
        base = Path(config_file).resolve().parent
        for table, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{config_file}: {table!r} must be a table ([server], [batching], "
                    "[rollout], [drift], [security], [ab] or [tracing])"
                )
            if table == "ab":
                top["ab"] = parse_ab_table(values, base)
            elif table in _TABLES:
                nested[table] = _convert(_TABLES[table], table, values, base)
            elif table in ("server", "security"):
                if table == "security" and "token-file" in values:
                    values = dict(values)
                    token_path = base / str(values.pop("token-file"))
                    top["token"] = _read_token(token_path)
                top.update(_convert(ServeSettings, table, values, base))
            else:
                raise ConfigError(
                    f"{config_file}: unknown table [{table}]; valid: server, batching, "
                    "rollout, drift, security, ab, tracing"
                )
    for key, value in overrides.items():
        table, _, name = key.rpartition(".")
        if table:
            nested[table][name] = value
        else:
            top[key] = value
    if "repository" not in top or top["repository"] is None:
        raise ConfigError(
            "no model repository given: pass --repository DIR (or `repository` under [server] "
            "in the config file)"
        )
    try:
        built = {name: cls(**nested[name]) for name, cls in _TABLES.items()}
        return replace(ServeSettings(repository=Path(top.pop("repository"))), **top, **built)
    except TypeError as err:
        raise ConfigError(f"invalid serve settings: {err}") from err


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(f"cannot read token file {path}: {err.strerror}") from err
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def settings_to_json(settings: ServeSettings) -> str:
    """The settings as JSON (paths as strings), for :func:`settings_from_json` in a worker."""
    return json.dumps(asdict(settings), default=str)


def settings_from_json(text: str) -> ServeSettings:
    """The settings :func:`settings_to_json` wrote, validated again."""
    raw = json.loads(text)
    nested = {name: cls(**raw.pop(name)) for name, cls in _TABLES.items()}
    ab = ab_settings_from_dict(raw.pop("ab"))
    for name in _PATHS & set(raw):
        if raw[name] is not None:
            raw[name] = Path(raw[name])
    return ServeSettings(**raw, **nested, ab=ab)
