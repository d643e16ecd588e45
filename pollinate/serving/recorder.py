"""Recording the serving metrics: what happens to requests, batches, versions and roll-outs.

:class:`~pollinate.serving.metrics.ServingMetrics` defines the metric families; this module
writes them for the model manager:

* :class:`VersionMetrics`: the metric children of one model version, looked up once when it
  loads (a ``labels()`` call costs on every request), with one method per event;
* :class:`MetricsRecorder`: failed requests (labelled by :func:`failure_reason`), version
  roles, roll-out outcomes, and the trigger sink that counts the retrain triggers it emits
  (:class:`CountingSink`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.serving.batcher import BatcherClosedError, OverloadedError, RequestTimeoutError
from pollinate.serving.drift import DriftReading, DriftSettings, TriggerSink
from pollinate.serving.inputs import InvalidInputError
from pollinate.serving.metrics import ServingMetrics

__all__ = ["CountingSink", "MetricsRecorder", "VersionMetrics", "failure_reason"]


def failure_reason(err: BaseException) -> str:
    """The ``reason`` label of a failed request: ``overloaded``, ``timeout``, ``invalid``,
    ``unavailable`` or ``model_error``."""
    if isinstance(err, OverloadedError):
        return "overloaded"
    if isinstance(err, RequestTimeoutError):
        return "timeout"
    if isinstance(err, InvalidInputError):
        return "invalid"
    if isinstance(err, BatcherClosedError):
        return "unavailable"
    return "model_error"


@dataclass(frozen=True)
class VersionMetrics:
    """The metric children of one version, looked up once (``labels()`` costs per call)."""

    http_requests: Any
    grpc_requests: Any
    predictions: Any
    latency: Any
    queue: Any
    batch_size: Any
    model_seconds: Any
    input_psi: Any
    output_psi: Any

    @classmethod
    def of(cls, metrics: ServingMetrics, model: str, version: int) -> VersionMetrics:
        labels = (model, str(version))
        return cls(
            http_requests=metrics.requests.labels(*labels, "http"),
            grpc_requests=metrics.requests.labels(*labels, "grpc"),
            predictions=metrics.predictions.labels(*labels),
            latency=metrics.latency.labels(*labels),
            queue=metrics.queue.labels(*labels),
            batch_size=metrics.batch_size.labels(*labels),
            model_seconds=metrics.model_seconds.labels(*labels),
            input_psi=metrics.drift.labels(*labels, "input"),
            output_psi=metrics.drift.labels(*labels, "output"),
        )

    def answered(self, protocol: str, rows: int, seconds: float, queue_s: float) -> None:
        """One request of ``rows`` samples answered in ``seconds``, ``queue_s`` of it queued."""
        (self.grpc_requests if protocol == "grpc" else self.http_requests).inc()
        self.predictions.inc(rows)
        self.latency.observe(seconds)
        self.queue.observe(queue_s)

    def batch(self, rows: int, seconds: float) -> None:
        """One model call of ``rows`` rows that took ``seconds`` (on the instance's thread)."""
        self.batch_size.observe(rows)
        self.model_seconds.observe(seconds)

    def drift(self, reading: DriftReading) -> None:
        """The PSI gauges of the latest drift reading."""
        self.input_psi.set(reading.input_psi)
        self.output_psi.set(reading.output_psi)


class CountingSink(TriggerSink):
    """The configured trigger sink, counting what it emits in the triggers metric."""

    def __init__(self, settings: DriftSettings, counter: Any) -> None:
        super().__init__(settings.trigger_dir, settings.webhook, settings.webhook_token)
        self._counter = counter

    def emit(self, reading: DriftReading) -> Path | None:
        path = super().emit(reading)
        self._counter.inc()
        return path


class MetricsRecorder:
    """Writes :class:`ServingMetrics` for the model manager and its roll-out policy."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def version(self, model: str, version: int) -> VersionMetrics:
        """The metric children of a version that has passed validation."""
        return VersionMetrics.of(self.metrics, model, version)

    def failed(self, model: str, version: int, protocol: str, reason: str) -> None:
        """One request failed or refused (``reason``: see :func:`failure_reason`)."""
        self.metrics.failures.labels(model, str(version), protocol, reason).inc()

    def role(self, model: str, version: int, role: str | None) -> None:
        """Set the role gauges of a version: 1 for ``role``, 0 for the other (None: both 0)."""
        for r in ("current", "canary"):
            self.metrics.role.labels(model, str(version), r).set(1.0 if r == role else 0.0)

    def rollout(self, model: str, outcome: str) -> None:
        """Count a roll-out outcome: ``promoted``, ``rolled_back``, ``failed_validation`` or
        ``registry`` (a swap to the registry's production version)."""
        self.metrics.rollouts.labels(model, outcome).inc()

    def trigger_sink(self, settings: DriftSettings, model: str) -> TriggerSink | None:
        """A counting sink for ``model``'s retrain triggers, or None without a target."""
        if settings.trigger_dir is None and settings.webhook is None:
            return None
        return CountingSink(settings, self.metrics.triggers.labels(model))
