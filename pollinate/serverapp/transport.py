"""How the ServerApp's messages travel: quick polling, and a clock for asynchronous rounds.

Flower's ``HttpGrid`` (the real SuperLink's) pulls replies every 3 s in ``send_and_receive``,
so a round that is done in 2.1 s is seen at 3 s and one done in 3.1 s at 6 s. The round loop
runs on :class:`PollingGrid` instead: the same grid, whose ``send_and_receive`` pushes once
and pulls after 50 ms, then at intervals growing by half up to 0.5 s. Wrapping a grid also
paces Flower's object pulls in this process (the ServerApp's only: the fast engine's grid
delivers in process and is never wrapped).

Asynchronous rounds (:mod:`pollinate.serverapp.fedbuff`) push and pull themselves and need
to wait for "the next reply or a deadline": :func:`wait_for_replies` sleeps on a real grid,
and on the fast engine's grid (which keeps a simulated clock, ``advance``) moves that clock
to the next simulated arrival instead. :func:`clock_of` says what time it is on a grid.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from pollinate._flower import pace_object_pulls
from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.protocol import INFO, pack_arrays, reads_packed, record_of, unpack_arrays

__all__ = [
    "BURST_PULL_S",
    "FIRST_PULL_S",
    "LONGEST_PULL_S",
    "PollingGrid",
    "SimulatedClock",
    "clock_of",
    "now_of",
]

#: The first pull after a push, and the longest interval between pulls.
FIRST_PULL_S = 0.05
LONGEST_PULL_S = 0.5
#: the pull after one that brought replies (each pull is a request the SuperLink serves)
BURST_PULL_S = 0.1


@runtime_checkable
class SimulatedClock(Protocol):
    """A grid that simulates time (the fast engine's with a latency model)."""

    def now(self) -> float:
        """Simulated seconds since the grid was made."""

    def advance(self, deadline: float) -> None:
        """Move the clock to the next reply's arrival, or to ``deadline`` if that is sooner."""


def clock_of(grid: Grid) -> SimulatedClock | None:
    """The grid's simulated clock, if it keeps one (the fast engine's always does: its
    replies arrive when that clock says, at once without a latency model)."""
    inner = getattr(grid, "inner", grid)
    return inner if isinstance(inner, SimulatedClock) else None


def now_of(grid: Grid) -> float:
    """Seconds on the grid's clock: simulated under a latency model, else ``monotonic``."""
    clock = clock_of(grid)
    if clock is not None and getattr(clock, "simulates_time", False):
        return clock.now()
    return time.monotonic()


class PollingGrid(Grid):
    """``grid`` with a ``send_and_receive`` that pulls replies within 50-500 ms of arrival,
    and within 100-250 ms of the one before when they come in a burst.

    Everything else is ``grid``'s own. A grid that delivers in process (``LocalGrid``) needs
    no wrapper: :meth:`wrap` returns it as it is.
    """

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self._packs: set[int] = set()  # nodes whose identity reply says they read packed models

    @classmethod
    def wrap(cls, grid: Grid) -> Grid:
        """``grid`` itself when it delivers in process or is wrapped already, else a wrapper;
        wrapping also paces this process's object pulls (replies' objects are fetched within
        50 ms of their upload, not 1-4 s: :func:`pollinate._flower.pace_object_pulls`)."""
        if isinstance(grid, PollingGrid) or getattr(grid, "delivers_in_process", False):
            return grid
        pace_object_pulls()
        return cls(grid)

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages``; the model goes packed (one flat array) to nodes that read it."""
        return self.inner.push_messages([self._packed(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies, each model unpacked; an identity reply that says its node reads
        packed models puts that node on the list."""
        return [self._unpacked(m) for m in self.inner.pull_messages(message_ids)]

    def _packed(self, msg: Message) -> Message:
        if msg.metadata.dst_node_id in self._packs and msg.has_content():
            content = pack_arrays(msg.content)
            if content is not None:
                msg.content = content  # the message goes as sent: packed
        return msg

    def _unpacked(self, reply: Message) -> Message:
        if reply.has_content():
            if reads_packed(record_of(reply.content, INFO, ConfigRecord)):
                self._packs.add(reply.metadata.src_node_id)
            try:
                content = unpack_arrays(reply.content)
            except ConfigError as err:  # left as sent: the round rejects it as malformed
                logger.warning("reply from node %d: %s", reply.metadata.src_node_id, err)
                return reply
            if content is not None:
                reply.content = content
        return reply

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull until every one has a reply or ``timeout`` passed.

        A message the SuperLink did not take (Flower returns no id for it) gets no reply;
        the caller counts it as missing.
        """
        pending = {i for i in self.push_messages(messages) if i}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = FIRST_PULL_S
        while pending:
            got = list(self.pull_messages(list(pending)))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            if got:  # replies come in bursts (a round's devices finish together): look
                interval = BURST_PULL_S  # again soon for the rest; while none come, back off
            time.sleep(interval if left is None else min(interval, left))
            interval = min(LONGEST_PULL_S, interval * 1.5)
        return replies
