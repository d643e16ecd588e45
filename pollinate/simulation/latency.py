"""Simulated time for the fast engine: how long each device takes, and who never answers.

The run's :class:`~pollinate.config.latency.LatencyModel` (``latency-median-s``,
``latency-sigma``, ``slow-fraction``, ``slow-factor``, ``dropout``) draws each message's reply
time, or a drop-out, from the run seed, the device and how many messages it was sent before,
so a run is repeatable and its engine's batching does not matter (the same model a real
device emulates with ``pollinate edge run --emulate-latency``).

:class:`SimulatedNetwork` holds the clock and the replies still on their way:
:class:`~pollinate.simulation.local_grid.LocalGrid` puts a reply there with its arrival time
and hands it out once the clock has passed it (``pull_messages``); the round loop moves the
clock (``advance``) when it waits (:mod:`pollinate.serverapp.transport`). Synchronous rounds
advance it by their slowest reply, or by the round timeout when a device dropped out.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from flwr.app import Message

from pollinate.config.latency import LatencyModel

__all__ = ["LatencyModel", "SimulatedNetwork"]


class SimulatedNetwork:
    """The clock of a simulated fleet and the replies on their way (see the module docstring)."""

    def __init__(self, model: LatencyModel) -> None:
        self.model = model
        self.clock = 0.0
        self._sent: Counter[int] = Counter()
        self._pending: dict[str, tuple[float, Message]] = {}  # message id -> arrival, reply

    def latency(self, device: int) -> float | None:
        """The reply time of the next message to ``device`` (``None``: it drops out)."""
        nth = self._sent[device]
        self._sent[device] += 1
        return self.model.draw(device, nth)

    def send(self, message_id: str, reply: Message, after: float) -> None:
        """``reply`` (to ``message_id``) arrives ``after`` seconds from now."""
        self._pending[message_id] = (self.clock + after, reply)

    def pull(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids`` that have arrived, in order of arrival."""
        ready = [
            (arrival, mid) for mid in message_ids
            if (entry := self._pending.get(mid)) is not None and (arrival := entry[0]) <= self.clock
        ]  # fmt: skip
        return [self._pending.pop(mid)[1] for _, mid in sorted(ready)]

    def advance(self, deadline: float) -> None:
        """The clock moves to the next arrival, or to ``deadline`` if that comes first."""
        self.clock = max(self.clock, min(self.next_arrival(), deadline))

    def next_arrival(self) -> float:
        """When the next reply still to come arrives (replies already due but not pulled,
        such as those the server gave up on, are not waited for)."""
        return min((t for t, _ in self._pending.values() if t > self.clock), default=math.inf)

    def wait_round(self, latencies: list[float | None], timeout: float | None) -> None:
        """A synchronous round: the clock moves by its slowest reply, or by ``timeout`` when
        a device dropped out (the server waits that long for it)."""
        if not latencies:
            return
        if any(t is None for t in latencies):
            done = [t for t in latencies if t is not None]
            self.clock += timeout if timeout is not None else max(done, default=0.0)
        else:
            self.clock += max(t for t in latencies if t is not None)
