"""OpenTelemetry tracing, off by default: the settings and one tracer provider per process.

Both the serving tier (``pollinate-serve``) and the ServerApp (``pollinate-server``) trace
through :func:`tracer_provider`: a root span is kept with probability ``sample_rate`` (a
``ParentBased(TraceIdRatioBased)`` sampler, so a caller's sampled ``traceparent`` is always
followed), and kept spans leave in batches, from a background thread, to an OTLP/HTTP
collector. Nothing imports ``opentelemetry`` until a provider is made: with tracing off
(no endpoint) a process never loads it.
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pollinate.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.id_generator import IdGenerator

__all__ = ["FROM_ENV", "TracingSettings", "epoch_ns", "otlp_traces_url", "tracer_provider"]

#: ``endpoint = "env"``: the exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables.
FROM_ENV = "env"

# perf_counter() seconds -> Unix nanoseconds, for spans timed after the fact
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def epoch_ns(perf_s: float) -> int:
    """A :func:`time.perf_counter` reading as the Unix time in nanoseconds spans want."""
    return _EPOCH_OFFSET_NS + int(perf_s * 1e9)


@dataclass(frozen=True)
class TracingSettings:
    """Where spans go (``""``: tracing off) and the share of root spans kept."""

    endpoint: str = ""
    sample_rate: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ConfigError(
                f"trace sample rate must be in [0, 1], got {self.sample_rate}; "
                "0.01 keeps one request in a hundred"
            )
        if self.endpoint and self.endpoint != FROM_ENV:
            otlp_traces_url(self.endpoint)

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``endpoint``: a bare collector address gets
    ``/v1/traces`` (as ``OTEL_EXPORTER_OTLP_ENDPOINT`` does); a URL with a path is kept."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ConfigError(
            f"trace endpoint {endpoint!r} is not an http(s) URL; give the OTLP/HTTP collector "
            f"like 'http://localhost:4318' (or {FROM_ENV!r}: OTEL_EXPORTER_OTLP_ENDPOINT)"
        )
    if url.path in ("", "/"):
        return urllib.parse.urlunsplit(url._replace(path="/v1/traces"))
    return endpoint


def tracer_provider(
    service: str,
    settings: TracingSettings,
    *,
    exporter: SpanExporter | None = None,
    id_generator: IdGenerator | None = None,
) -> TracerProvider:
    """A provider for ``service`` that samples roots at ``settings.sample_rate`` and exports
    in batches to ``settings.endpoint`` over OTLP/HTTP (or to ``exporter``, for tests);
    ``id_generator``: the span and trace ids (default: the SDK's random ones).

    It is not made the global provider: each caller holds its own, so tests and several
    servers in one process do not share one. Call ``shutdown()`` on it to flush at exit.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as err:
        raise ConfigError(
            f"tracing needs OpenTelemetry ({err.name} is missing): "
            "pip install 'pollinate[tracing]', or leave the trace endpoint unset"
        ) from err

    if exporter is None:
        url = None if settings.endpoint == FROM_ENV else otlp_traces_url(settings.endpoint)
        exporter = OTLPSpanExporter(endpoint=url, timeout=10)
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.sample_rate)),
        resource=Resource.create({"service.name": service}),
        id_generator=id_generator,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
