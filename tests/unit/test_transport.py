"""The round loop's polling grid: replies are pulled within 50-500 ms of arriving (Flower's
HttpGrid waits 3 s between pulls) and soon after the one before in a burst, a message the
SuperLink did not take is not waited for, and the timeout holds. The grid below stands in
for a SuperLink (its replies appear after a delay); the real one is behind every integration
test of a federation."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict

from pollinate.serverapp.transport import LONGEST_PULL_S, PollingGrid
from pollinate.simulation.local_grid import LocalGrid
from tests.support.grids import PushPullGrid

pytestmark = pytest.mark.unit


def _messages(n: int) -> list[Message]:
    LocalGrid(1)  # sets the process' task identity, which Message needs
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(n)]


def test_replies_are_pulled_soon_after_they_arrive() -> None:
    inner = PushPullGrid(delay=0.4)
    grid = PollingGrid(inner)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_messages(3), timeout=30))
    assert len(replies) == 3
    gaps = [b - a for a, b in zip(inner.pulls, inner.pulls[1:], strict=False)]
    assert all(g <= LONGEST_PULL_S + 0.2 for g in gaps)  # never Flower's 3 s
    assert inner.pulls[-1] - started < 0.4 + LONGEST_PULL_S + 0.2


def test_a_message_not_taken_is_not_waited_for_and_the_timeout_holds() -> None:
    inner = PushPullGrid(delay=0.1, refuse=1)
    replies = list(PollingGrid(inner).send_and_receive(_messages(3), timeout=30))
    assert len(replies) == 2  # the refused one gets none, and nothing waits for it

    slow = PushPullGrid(delay=60.0)
    started = time.monotonic()
    assert list(PollingGrid(slow).send_and_receive(_messages(2), timeout=0.5)) == []
    assert time.monotonic() - started < 0.5 + LONGEST_PULL_S + 0.5


def test_in_process_grids_are_not_wrapped() -> None:
    local = LocalGrid(2)
    assert PollingGrid.wrap(local) is local
    wrapped = PollingGrid.wrap(PushPullGrid(delay=0.0))
    assert isinstance(wrapped, PollingGrid) and PollingGrid.wrap(wrapped) is wrapped


class _BurstGrid(PushPullGrid):
    """Replies ready at their own times (seconds after the push), one per message."""

    def __init__(self, ready_after: list[float]) -> None:
        super().__init__(nodes=range(1, len(ready_after) + 1))
        self.ready_after = ready_after

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(super().push_messages(messages))
        for mid, after in zip(ids, self.ready_after, strict=True):
            self.pushed[mid] = (self.pushed[mid][0] + after, self.pushed[mid][1])
        return ids


def test_after_a_reply_the_next_of_its_burst_is_pulled_soon() -> None:
    """Two replies 2 s into the round, the last 0.15 s later. Backing off alone, the pull
    after the first two comes 0.5 s later (0.39 s after the last reply arrived); looking
    again 0.1 s after a reply (then 0.15, ...) finds it within 0.25 s."""
    inner = _BurstGrid([2.0, 2.0, 2.15])
    started = time.monotonic()
    replies = list(PollingGrid(inner).send_and_receive(_messages(3), timeout=30))
    assert len(replies) == 3
    last_ready = started + 2.15
    assert inner.pulls[-1] - last_ready < 0.25, [round(p - started, 3) for p in inner.pulls]
