"""A stand-in for Flower's Grid that answers through push and pull only, for the ServerApp's
transport tests (``serverapp.transport.PollingGrid`` pushes, then polls for replies)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class PushPullGrid(Grid):
    """Each pushed message gets the reply :meth:`answer` makes, pullable ``delay`` seconds
    after the push; the first ``refuse`` messages of a push are not taken (no id). Pull times
    are recorded in ``pulls``. ``send_and_receive`` fails: the polling grid must not call it.
    """

    def __init__(self, nodes: Sequence[int] = (1, 2, 3), delay: float = 0.0, refuse: int = 0):
        self.nodes = list(nodes)
        self.delay = delay
        self.refuse = refuse
        self.pushed: dict[str, tuple[float, Message]] = {}
        self.pulls: list[float] = []
        self._count = 0

    def answer(self, msg: Message) -> Message:
        """The node's reply to ``msg`` (an empty one)."""
        return Message(RecordDict(), reply_to=msg)

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for i, msg in enumerate(messages):
            if i < self.refuse:
                ids.append("")
                continue
            mid = f"m{self._count}"
            self._count += 1
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed[mid] = (time.monotonic() + self.delay, msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        self.pulls.append(now)
        out = []
        for mid in list(message_ids):
            due, msg = self.pushed.get(mid, (float("inf"), None))
            if msg is not None and due <= now:
                del self.pushed[mid]
                out.append(self.answer(msg))
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("the polling grid must not call the inner send_and_receive")
