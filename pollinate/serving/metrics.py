"""Prometheus metrics of the serving tier, per model version, on their own registry.

Served on the metrics port (``/metrics``); with ``--workers N`` the supervisor serves them
summed over the workers (gauges: the largest value among live workers). Names:

- ``pollinate_serving_requests_total{model,version,protocol}``: answered inference requests
- ``pollinate_serving_request_failures_total{model,version,protocol,reason}``: failed ones
  (``reason``: ``overloaded``, ``timeout``, ``invalid``, ``model_error``, ``unavailable``)
- ``pollinate_serving_predictions_total{model,version}``: samples answered
- ``pollinate_serving_request_duration_seconds{model,version}``: latency histogram (in server)
- ``pollinate_serving_queue_duration_seconds{model,version}``: time queued before the batch ran
- ``pollinate_serving_batch_size{model,version}``: rows per model call
- ``pollinate_serving_model_seconds{model,version}``: duration of each model call
- ``pollinate_serving_drift_psi{model,version,kind}``: PSI of inputs / outputs vs the reference
- ``pollinate_serving_retrain_triggers_total{model}``: drift triggers emitted
- ``pollinate_serving_version_role{model,version,role}``: 1 while a version is current/canary
- ``pollinate_serving_rollouts_total{model,outcome}``: promoted, rolled_back, failed_validation,
  registry (a swap to the registry's production version)
- ``pollinate_serving_ab_requests_total{experiment,variant}``: requests an A/B variant answered
- ``pollinate_serving_ab_feedback_total{experiment,variant}``: outcomes recorded per variant
- ``pollinate_serving_ab_feedback_rejected_total{model,reason}``: feedback refused
  (``reason``: ``unknown_id``, ``duplicate``, ``invalid``, ``no_experiment``)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServingMetrics"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    """Every serving metric, registered on a registry of its own (one per server)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        mv = ["model", "version"]
        self.requests = Counter(
            "pollinate_serving_requests", "Answered inference requests",
            [*mv, "protocol"], registry=r,
        )  # fmt: skip
        self.failures = Counter(
            "pollinate_serving_request_failures", "Failed or refused inference requests",
            [*mv, "protocol", "reason"], registry=r,
        )  # fmt: skip
        self.predictions = Counter(
            "pollinate_serving_predictions", "Samples answered", mv, registry=r
        )
        self.latency = Histogram(
            "pollinate_serving_request_duration_seconds", "Request latency inside the server",
            mv, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue = Histogram(
            "pollinate_serving_queue_duration_seconds", "Time queued before the batch ran",
            mv, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "pollinate_serving_batch_size", "Rows per model call", mv,
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_seconds = Histogram(
            "pollinate_serving_model_seconds", "Duration of each model call", mv,
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # With --workers, gauges report the largest value among the live workers.
        self.drift = Gauge(
            "pollinate_serving_drift_psi", "PSI of inputs/outputs against the bundle reference",
            [*mv, "kind"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.triggers = Counter(
            "pollinate_serving_retrain_triggers", "Retraining triggers emitted", ["model"],
            registry=r,
        )  # fmt: skip
        self.role = Gauge(
            "pollinate_serving_version_role", "1 while a version has this role",
            [*mv, "role"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.rollouts = Counter(
            "pollinate_serving_rollouts", "Roll-out outcomes", ["model", "outcome"], registry=r
        )
        ev = ["experiment", "variant"]
        self.ab_requests = Counter(
            "pollinate_serving_ab_requests", "Requests answered by an A/B variant", ev, registry=r
        )
        self.ab_feedback = Counter(
            "pollinate_serving_ab_feedback", "A/B outcomes recorded", ev, registry=r
        )
        self.ab_rejected = Counter(
            "pollinate_serving_ab_feedback_rejected", "A/B feedback refused",
            ["model", "reason"], registry=r,
        )  # fmt: skip
