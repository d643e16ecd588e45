"""Tracing of the federated rounds (OpenTelemetry; on with the run-config key
``trace-endpoint``, service ``pollinate-server``).

Each round is one trace: a ``round`` span (``server_round``; when it ends ``sampled``,
``replied``, ``declined``, ``rejected``, ``failed``) whose children are the phases
:mod:`~pollinate.serverapp.rounds` marks with :func:`phase`: ``sampling``, ``training``
(the wait for the replies), ``aggregation`` and ``evaluation``. Every round is kept (rounds
are few). With tracing off :func:`phase` is an empty context manager and ``opentelemetry`` is
never imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

from pollinate._tracing import TracingSettings, tracer_provider
from pollinate.config import RunSettings
from pollinate.rundir.records import RoundRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

__all__ = ["SERVICE_NAME", "RoundTracing", "phase"]

SERVICE_NAME = "pollinate-server"

# The tracer of the round being played in this thread (None: not tracing).
_ACTIVE: ContextVar[Tracer | None] = ContextVar("pollinate_round_tracer", default=None)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A child span of the current round named ``name`` (nothing when tracing is off)."""
    tracer = _ACTIVE.get()
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(name):
        yield


class RoundTracing:
    """The run's tracer: ``with tracing.round(rnd) as span:`` around one round.

    ``exporter`` replaces the OTLP exporter (tests). Use it as a context manager: leaving it
    flushes the spans still buffered.
    """

    def __init__(self, settings: RunSettings, *, exporter: SpanExporter | None = None) -> None:
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        if settings.trace_endpoint or exporter is not None:
            config = TracingSettings(endpoint=settings.trace_endpoint, sample_rate=1.0)
            self._provider = tracer_provider(SERVICE_NAME, config, exporter=exporter)
            self._tracer = self._provider.get_tracer("pollinate.serverapp")

    @contextlib.contextmanager
    def round(self, rnd: int) -> Iterator[RoundSpan]:
        """The ``round`` span of round ``rnd``; :func:`phase` spans inside are its children."""
        if self._tracer is None:
            yield RoundSpan(None)
            return
        with self._tracer.start_as_current_span("round", attributes={"server_round": rnd}) as span:
            token = _ACTIVE.set(self._tracer)
            try:
                yield RoundSpan(span)
            finally:
                _ACTIVE.reset(token)

    def __enter__(self) -> RoundTracing:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._provider is not None:
            self._provider.shutdown()


class RoundSpan:
    """A round's span, given the round's outcome when it ends."""

    __slots__ = ("_span",)

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def record(self, record: RoundRecord | None) -> None:
        """The round's client counts (``stopped``: the run ended before it)."""
        if self._span is None:
            return
        if record is None:
            self._span.set_attribute("stopped", True)
            return
        for key in ("sampled", "replied", "declined", "rejected", "failed"):
            self._span.set_attribute(key, getattr(record, key))
