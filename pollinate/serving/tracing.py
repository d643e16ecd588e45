"""Request tracing of ``pollinate serve`` (OpenTelemetry; on with ``--trace-endpoint``).

Each inference request gets an ``infer`` span (kind SERVER), the child of the caller's W3C
``traceparent`` (REST header or gRPC metadata) when one is given; its ``traceparent`` goes
back in the reply (REST header, gRPC trailing metadata). A sampled request has four
children, timed on the paths the request already takes and written when each ends:

* ``decode``: the body read and decoded to tensors;
* ``queue``: from the batcher's queue to the start of its batch;
* ``batch``: the batch that carried it, from start to answers, parented by the batch's first
  traced request and linked to every traced request in it; its child ``inference`` is the
  model call itself;
* ``encode``: the reply built from the outputs.

The sampling decision comes first and costs an unsampled request almost nothing: a root's
trace id is drawn here and kept with the rule of the provider's ``TraceIdRatioBased`` (its
low 64 bits under the rate's bound; the SDK, handed that id, decides the same), a caller's
unsampled ``traceparent`` is followed by not tracing. Only a traced request gets spans and
a ``traceparent`` in its reply; ``opentelemetry`` is imported only when tracing is on.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from pollinate._tracing import TracingSettings, epoch_ns, tracer_provider

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.trace import Span, Status

__all__ = ["SERVICE_NAME", "RequestTrace", "ServingTracer", "serving_tracer"]

SERVICE_NAME = "pollinate-serve"


class RequestTrace:
    """A traced request's ``infer`` span and its children."""

    __slots__ = ("_owner", "context", "span", "traceparent")

    def __init__(self, owner: ServingTracer, span: Span) -> None:
        self._owner = owner
        self.span = span
        ctx = span.get_span_context()
        self.traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
        self.context = owner.set_span_in_context(span)

    def phase(self, name: str, start: float, end: float) -> None:
        """A child span from ``start`` to ``end`` (:func:`time.perf_counter` seconds)."""
        child = self._owner.tracer.start_span(
            name, context=self.context, start_time=epoch_ns(start)
        )
        child.end(end_time=epoch_ns(end))

    def batch_ran(
        self,
        members: list[tuple[Any, float]],
        started: float,
        model: tuple[float, float],
        ended: float,
        rows: int,
    ) -> None:
        """Called by the batcher on this batch's first traced request (``members``: every
        traced request of the batch with the time it was queued): each request's ``queue``
        span, then ``batch`` here (linked to them all) and its ``inference``."""
        owner = self._owner
        for trace, enqueued in members:
            trace.phase("queue", enqueued, started)
        batch = owner.tracer.start_span(
            "batch",
            context=self.context,
            start_time=epoch_ns(started),
            links=[owner.link(t.span.get_span_context()) for t, _ in members],
            attributes={"pollinate.batch.requests": len(members), "pollinate.batch.rows": rows},
        )
        inference = owner.tracer.start_span(
            "inference",
            context=owner.set_span_in_context(batch),
            start_time=epoch_ns(model[0]),
        )
        inference.end(end_time=epoch_ns(model[1]))
        batch.end(end_time=epoch_ns(ended))

    def finish(self, end: float, status: str, *, error: bool = False, **attributes: Any) -> None:
        """End the ``infer`` span at ``end`` with the reply's ``status`` (an HTTP code or a
        gRPC status name); ``error``: the server failed (5xx, INTERNAL, timeouts)."""
        span = self.span
        span.set_attribute("pollinate.status", status)
        for key, value in attributes.items():
            span.set_attribute(f"pollinate.{key}", value)
        if error:
            span.set_status(self._owner.error(status))
        span.end(end_time=epoch_ns(end))


class ServingTracer:
    """The server's tracer: a :class:`RequestTrace` for each inference request it samples.

    ``provider`` must hand out root trace ids through ``ids`` (:func:`serving_tracer` makes
    both), and sample roots at ``sample_rate``.
    """

    def __init__(self, provider: TracerProvider, ids: Any, sample_rate: float) -> None:
        from opentelemetry.context import Context
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
        from opentelemetry.trace import (
            Link,
            SpanKind,
            Status,
            StatusCode,
            get_current_span,
            set_span_in_context,
        )
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._ids = ids
        self._limit = TraceIdRatioBased.TRACE_ID_LIMIT
        self._bound = TraceIdRatioBased.get_bound_for_rate(sample_rate)
        self._get_span = get_current_span
        self.tracer = provider.get_tracer("pollinate.serving")
        self.set_span_in_context = set_span_in_context
        self.link = Link
        self._server = SpanKind.SERVER
        self._empty = Context()
        self._propagator = TraceContextTextMapPropagator()
        self._status = Status
        self._error_code = StatusCode.ERROR

    def error(self, message: str) -> Status:
        """A span's status for a request the server failed."""
        return self._status(self._error_code, message)

    def start(
        self,
        started: float,
        traceparent: str | None,
        tracestate: str | None,
        *,
        model: str,
        protocol: str,
    ) -> RequestTrace | None:
        """The ``infer`` span of a request that arrived at ``started`` (perf_counter), the
        child of ``traceparent`` when the caller sent a valid one; None: not traced (a
        root not sampled, or a caller's trace it did not sample)."""
        parent = None
        if traceparent is not None:
            carrier = {"traceparent": traceparent}
            if tracestate is not None:
                carrier["tracestate"] = tracestate
            parent = self._propagator.extract(carrier)
            caller = self._get_span(parent).get_span_context()
            if not caller.is_valid:
                parent = None  # malformed: a root of our own
            elif not caller.trace_flags.sampled:
                return None
        if parent is None:
            trace_id = random.getrandbits(128)
            if not trace_id or trace_id & self._limit >= self._bound:
                return None
            self._ids.next_trace_id = trace_id  # the root's id: the SDK samples it too
            parent = self._empty
        span = self.tracer.start_span(
            "infer",
            context=parent,
            kind=self._server,
            start_time=epoch_ns(started),
            attributes={"pollinate.model": model, "pollinate.protocol": protocol},
        )
        return RequestTrace(self, span)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop the exporter's thread."""
        self.provider.shutdown()


def serving_tracer(
    settings: TracingSettings, *, exporter: SpanExporter | None = None
) -> ServingTracer | None:
    """The tracer ``settings`` ask for; ``None`` (nothing imported) when tracing is off.
    ``exporter`` replaces the OTLP exporter (tests: an in-memory one) and turns it on."""
    if not settings.enabled and exporter is None:
        return None
    ids = _drawn_ids()
    provider = tracer_provider(SERVICE_NAME, settings, exporter=exporter, id_generator=ids)
    return ServingTracer(provider, ids, settings.sample_rate)


def _drawn_ids() -> IdGenerator:
    """The SDK's random ids, except a root's trace id: the one :meth:`ServingTracer.start`
    drew and sampled, set just before it starts the span (on the event loop's thread)."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class DrawnIds(RandomIdGenerator):
        next_trace_id = 0

        def generate_trace_id(self) -> int:
            trace_id, self.next_trace_id = self.next_trace_id, 0
            return trace_id or super().generate_trace_id()

    return DrawnIds()
