"""Flower's SuperNode with paced polling: ``python -m pollinate.device.supernode [ARGS]``.

Flower's SuperNode (flwr 1.42, ``flwr.supernode.start_client_internal``) asks the SuperLink
for a message and, when there is none, sleeps 3 s; it then waits for its ClientApp's reply,
and for that reply's objects, in 0.5 s steps. Every device therefore starts a round 0-3 s
after the server sent it, and a synchronous round waits for its latest device: on a 4-device
fleet that was 2-3 s of every 8 s round.

This runs Flower's own ``flower-supernode`` (its arguments, TLS, node authentication, state
and runtime API, unchanged) with those waits paced, through the ``time`` its loop calls:

- a node that handled a message within the last :data:`ACTIVE_WINDOW_S` asks again after
  ``$POLLINATE_SUPERNODE_POLL_S`` (the daemon's ``--poll-interval``, default 0.5 s);
- an idle node keeps Flower's 3 s, so an idle fleet costs the SuperLink what Flower's does;
- the waits for the local reply poll every :data:`LOCAL_STEP_S` (no network involved);
- with ``$POLLINATE_EXECUTOR_WAKE`` set (the daemon's warm executor), each message it stores
  wakes the executor at once (:mod:`pollinate.device.wake`), which otherwise polls for tasks
  only once a second;
- with ``$POLLINATE_TASK_HEARTBEAT_S`` set (the warm executor's 10 s), a task whose process
  went silent is offered again, or failed with an error reply, on that clock instead of
  Flower's 30 s (``_flower.quick_task_expiry``; a fork killed by a signal is answered sooner
  still, by the executor: ``device/fork_crash.py``).

Should a later Flower change that loop, the SuperNode runs unpaced, with one warning.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from pollinate.device.wake import WAKE_ENV, Waker
from pollinate.errors import ConfigError

__all__ = [
    "ACTIVE_WINDOW_S",
    "DEFAULT_POLL_S",
    "FLOWER_IDLE_POLL_S",
    "LOCAL_STEP_S",
    "POLL_ENV",
    "PacedTime",
    "main",
    "poll_interval",
    "wake_on_message",
]

#: the environment variable the daemon passes its ``--poll-interval`` in
POLL_ENV = "POLLINATE_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.5
#: Flower's own wait after an empty pull (what an idle node keeps)
FLOWER_IDLE_POLL_S = 3.0
#: how long after its last message a node counts as active (a run's next round comes sooner)
ACTIVE_WINDOW_S = 30.0
#: the step of the waits for the ClientApp's reply, which are local
LOCAL_STEP_S = 0.05
_MIN_POLL_S = 0.05


def poll_interval(value: str | float | None) -> float:
    """The pull interval of an active node, in seconds: ``value``, or :data:`DEFAULT_POLL_S`
    when it is empty; one :class:`ConfigError` when it is not a number in [0.05, 3]."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_POLL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not _MIN_POLL_S <= seconds <= FLOWER_IDLE_POLL_S:  # also refuses nan
        raise ConfigError(
            f"poll interval: {value!r} is not a number of seconds from {_MIN_POLL_S} to "
            f"{FLOWER_IDLE_POLL_S} (shorter starts rounds sooner and costs the SuperLink more "
            f"requests); for example --poll-interval {DEFAULT_POLL_S}"
        )
    return seconds


class PacedTime:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: ``sleep`` is paced
    (see the module's text), everything else is :mod:`time`'s own."""

    def __init__(
        self,
        poll_s: float,
        *,
        window_s: float = ACTIVE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.poll_s = poll_s
        self._window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._active_until = -math.inf

    @property
    def active(self) -> bool:
        """Whether the node handled a message within the active window."""
        return self._clock() < self._active_until

    def sleep(self, seconds: float) -> None:
        """Flower's wait of ``seconds``, paced."""
        if seconds >= FLOWER_IDLE_POLL_S:  # an empty pull
            self._sleep(self.poll_s if self.active else seconds)
            return
        self._active_until = self._clock() + self._window_s  # handling a message
        self._sleep(min(seconds, LOCAL_STEP_S))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def wake_on_message(loop: Any, waker: Waker) -> bool:
    """Have Flower's SuperNode loop (``loop``: its module) wake the executor each time it has
    pulled and stored a message (and so made its task); ``False`` when the loop changed."""
    pull = getattr(loop, "_pull_and_store_message", None)
    if not callable(pull):
        print("pollinate supernode: Flower's SuperNode loop changed; the executor is not woken "
              "when a message arrives", file=sys.stderr)  # fmt: skip
        return False

    def pull_and_wake(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            waker.wake()
        return run_id

    loop._pull_and_store_message = pull_and_wake
    return True


def main() -> None:
    """Pace Flower's SuperNode loop, then run ``flower-supernode`` with this argv."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    try:
        poll_s = poll_interval(os.environ.get(POLL_ENV))
    except ConfigError as err:
        sys.exit(f"pollinate supernode: {err}")
    from pollinate._flower import (
        TASK_HEARTBEAT_ENV,
        pace_object_pulls,
        quick_task_expiry,
        run_flower,
        task_heartbeat_s,
    )

    pace_object_pulls()
    heartbeat = os.environ.get(TASK_HEARTBEAT_ENV)  # a warm executor's forks: 10 s
    if heartbeat and not quick_task_expiry(task_heartbeat_s(heartbeat), side="node"):
        print("pollinate supernode: Flower's task state changed; a task whose process "
              "died is given up on Flower's own clock", file=sys.stderr)  # fmt: skip
    if wake_path := os.environ.get(WAKE_ENV):
        wake_on_message(loop, Waker(wake_path))
    paced = getattr(loop, "time", None) is time  # a Flower whose loop sleeps through `time`
    if paced:
        loop.time = PacedTime(poll_s)  # type: ignore[attr-defined,assignment]
    run_flower(
        "flower-supernode",
        flower_supernode,
        patched=paced,
        fallback="Flower's SuperNode loop changed; polling at Flower's own pace",
    )


if __name__ == "__main__":
    main()
