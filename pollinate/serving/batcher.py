"""Dynamic batching: one bounded queue per model version, batches formed across requests.

Requests wait in a queue counted in samples (rows). A free model instance takes what is
queued, up to ``max_batch_size`` rows, runs it on its own thread and hands each request its
slice of the outputs; requests that arrive while every instance is busy form the next batch.
With ``max_queue_delay`` > 0 a free instance first waits until the oldest request has been
queued that long, or a full batch is queued. Batches are started from the event loop's own
callbacks (a submit, an instance coming free, the delay ending) and their results set from
one callback each, so a request costs no task switches beyond its own.

Admission is decided at once: a request that would push the queue past ``max_queue_size``
rows raises :class:`OverloadedError` without waiting, so overload costs a refusal, never a
queue that grows without bound. A request still queued when its timeout expires is dropped
from the queue and fails with :class:`RequestTimeoutError`.

A request submitted with a trace (a sampled request, ``tracing.py``) is told, once its batch
has answered, when it was queued and when the batch and its model call ran; the spans are
made there, never here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "BatchResult",
    "Batcher",
    "BatcherClosedError",
    "OverloadedError",
    "RequestTimeoutError",
    "TracedRequest",
]

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
# Called on the worker thread after each batch: (batch rows, inputs, outputs, model seconds).
BatchHook = Callable[[int, dict[str, np.ndarray], dict[str, np.ndarray], float], None]


class TracedRequest(Protocol):
    """A request being traced (``tracing.py``): after a batch, the batch's first traced
    request is told of all of them with their queueing times, the batch's start, the model
    call's start and end, and the batch's end (``perf_counter`` seconds), on the loop."""

    def batch_ran(
        self,
        members: list[tuple[Any, float]],
        started: float,
        model: tuple[float, float],
        ended: float,
        rows: int,
    ) -> None: ...


class OverloadedError(Exception):
    """The queue is full: the request is refused at once."""


class RequestTimeoutError(Exception):
    """The request waited longer than its timeout."""


class BatcherClosedError(Exception):
    """The batcher stopped taking requests (its model version is being unloaded)."""


@dataclass(frozen=True)
class BatchResult:
    """One request's outputs and how long it waited in the queue."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    batch_rows: int


@dataclass(eq=False)
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[BatchResult]
    enqueued: float
    dropped: bool = False
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    trace: TracedRequest | None = field(default=None, repr=False)


class Batcher:
    """The queue and model instances of one model version.

    Args:
        runners: One callable per model instance; each runs on its own thread.
        max_batch_size: Most rows in one model call.
        max_queue_delay_s: Longest wait for more rows after the oldest request arrived.
        max_queue_size: Most rows waiting; beyond it requests are refused at once.
        on_batch: Called on the worker thread after each model call.
    """

    def __init__(
        self,
        runners: Sequence[Runner],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        on_batch: BatchHook | None = None,
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one model instance")
        self._runners = list(runners)
        self.max_batch_size = max_batch_size
        self._delay = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._inflight = 0
        self._idle = list(reversed(self._runners))  # instances free to take a batch
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None  # a pending _dispatch (batching delay)
        self._executor = ThreadPoolExecutor(
            max_workers=len(self._runners), thread_name_prefix="pollinate-model"
        )

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def pending(self) -> int:
        """Requests queued or in a running batch."""
        return len(self._queue) + self._inflight

    def start(self) -> None:
        """Serve requests on the running event loop."""
        self._loop = asyncio.get_running_loop()

    def admits(self, rows: int = 1) -> bool:
        """Whether a request of ``rows`` samples would be taken now. With ``max_queue_size``
        0 there is no queue: only while a model instance is free and nothing waits."""
        if self.max_queue_size == 0:
            return not self._queue and bool(self._idle)
        return self._queued_rows + rows <= self.max_queue_size

    def submit(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        timeout_s: float,
        trace: TracedRequest | None = None,
    ) -> asyncio.Future[BatchResult]:
        """Queue a request of ``rows`` samples; raises :class:`OverloadedError` when full.

        Returns a future with the request's :class:`BatchResult`; it fails with
        :class:`RequestTimeoutError` if the request is still queued after ``timeout_s``.
        ``trace``: a sampled request's spans, told how its batch ran.
        """
        loop = self._loop
        if self._closed or loop is None:
            raise BatcherClosedError("this model version is not taking requests")
        if not self.admits(rows):
            if self.max_queue_size == 0:
                raise OverloadedError("every model instance is busy and there is no queue")
            raise OverloadedError(
                f"the queue holds {self._queued_rows} of {self.max_queue_size} samples; "
                f"this request of {rows} does not fit"
            )
        item = _Item(inputs, rows, loop.create_future(), time.perf_counter(), trace=trace)
        item.timer = loop.call_later(timeout_s, self._expire, item)
        self._queue.append(item)
        self._queued_rows += rows
        self._dispatch()
        return item.future

    def _expire(self, item: _Item) -> None:
        if item.future.done():
            return
        if not item.dropped and item in self._queue:
            item.dropped = True
            self._queued_rows -= item.rows
        item.future.set_exception(
            RequestTimeoutError("the request timed out waiting for the model")
        )

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if item.dropped:
                self._queue.popleft()
                continue
            if batch and rows + item.rows > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= item.rows
            rows += item.rows
            batch.append(item)
        return batch

    def _dispatch(self) -> None:
        """Hand queued rows to free instances (on the loop: after a submit, when an instance
        comes free, when a batching delay ends). Each batch goes straight to the instance's
        thread, and its results come straight back (:meth:`_deliver`): no task in between.

        With a delay, a free instance waits until the oldest request has been queued that
        long, or a full batch is queued. The event loop sleeps in whole milliseconds (epoll),
        so a timed wait for 100 µs would take 1 ms: the last millisecond is waited by
        re-checking on each turn of the loop, which reads and queues the requests that have
        arrived meanwhile.
        """
        loop = self._loop
        assert loop is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._idle and self._queue:
            # without a queue no other request can join: waiting would only add latency
            if self._delay > 0 and self.max_queue_size and self._queued_rows < self.max_batch_size:
                while self._queue and self._queue[0].dropped:
                    self._queue.popleft()
                if not self._queue:
                    return
                remaining = self._queue[0].enqueued + self._delay - time.perf_counter()
                if remaining > 0:
                    self._timer = (
                        loop.call_soon(self._dispatch)
                        if remaining < 0.0011
                        else loop.call_later(remaining - 0.001, self._dispatch)
                    )
                    return
            batch = self._take()
            if not batch:
                return
            runner = self._idle.pop()
            self._inflight += len(batch)
            self._executor.submit(self._work, loop, runner, batch)

    def _work(self, loop: asyncio.AbstractEventLoop, runner: Runner, batch: list[_Item]) -> None:
        """On the instance's thread: run the batch, pass the outcome back to the loop."""
        started = time.perf_counter()
        model = [started, started]  # the model call's start and end
        try:
            outputs: dict[str, np.ndarray] | BaseException = self._run(runner, batch, model)
        except Exception as err:  # the model failed: every request of the batch fails
            outputs = err
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the answers
            loop.call_soon_threadsafe(self._deliver, runner, batch, outputs, started, model)

    def _deliver(
        self,
        runner: Runner,
        batch: list[_Item],
        outputs: dict[str, np.ndarray] | BaseException,
        started: float,
        model: list[float],
    ) -> None:
        self._inflight -= len(batch)
        self._idle.append(runner)
        if self._queue:
            self._dispatch()  # keep the instance busy before answering
        total = sum(item.rows for item in batch)
        start = 0
        for item in batch:
            if item.timer is not None:
                item.timer.cancel()
            if not item.future.done():
                if isinstance(outputs, BaseException):
                    item.future.set_exception(outputs)
                else:
                    part = (
                        outputs if len(batch) == 1
                        else {k: v[start : start + item.rows] for k, v in outputs.items()}
                    )  # fmt: skip
                    item.future.set_result(BatchResult(part, started - item.enqueued, total))
            start += item.rows
        traced = [(item.trace, item.enqueued) for item in batch if item.trace is not None]
        if traced:
            traced[0][0].batch_ran(
                traced, started, (model[0], model[1]), time.perf_counter(), total
            )

    def _run(self, runner: Runner, batch: list[_Item], model: list[float]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {
                name: np.concatenate([item.inputs[name] for item in batch])
                for name in batch[0].inputs
            }
        model[0] = time.perf_counter()
        outputs = runner(inputs)
        model[1] = time.perf_counter()
        if self._on_batch is not None:
            rows = sum(item.rows for item in batch)
            self._on_batch(rows, inputs, outputs, model[1] - model[0])
        return outputs

    async def close(self, *, drain: bool = True) -> None:
        """Stop taking requests; with ``drain``, finish every queued request first."""
        self._closed = True
        if drain and self._loop is not None:
            while self._queue or self._inflight:
                if self._queue and self._idle and self._timer is None:
                    self._dispatch()
                await asyncio.sleep(0.005)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the model version was unloaded"))
        self._queue.clear()
        self._executor.shutdown(wait=True)
