"""The SuperNode wakes its warm executor when a message arrives: one FIFO per device.

Flower's SuperExec asks its SuperNode for a task every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
seconds, whether a message came or not. At the 0.2 s the warm executor used, every device
cost its SuperNode and its executor five HTTP requests a second, about 1.3 CPU s of a
10-device round on two cores, and a task still waited 0.1 s on average to be taken.

Here the daemon makes a FIFO in the device's state folder and names it to both processes
(:data:`WAKE_ENV`). The SuperNode writes one byte to it when it has stored a message (and
with it the task for the executor); the executor sleeps on the FIFO instead of the clock, so
it asks for the task at once, and otherwise every :data:`IDLE_POLL_S` (Flower's default); the
fleet's SuperNodes went 1.95 -> 1.3 CPU s a 10-device round and its executors 0.58 -> 0.22. A
task Flower offers again (its process went silent before starting it; a fork killed by a
signal is answered instead, ``device/fork_crash.py``) is not woken for and waits for that
poll, after Flower's 10 s wait (``_flower.quick_task_expiry``). A lost byte costs at most
that interval; nothing else rides on the FIFO (it carries no data, only
"look now"), and it is private to the user (0600).

:func:`warm_executor_env` is what the daemon gives both processes: the FIFO, and the 10 s
task heartbeat clock its forks keep (``_flower.quick_task_expiry``).

Standard library only (and ``pollinate._flower``'s constants): the SuperNode's wrapper and
the executor import it before Flower.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import time
from pathlib import Path
from typing import Any

from pollinate._flower import TASK_HEARTBEAT_ENV, WARM_TASK_HEARTBEAT_S

__all__ = [
    "IDLE_POLL_S",
    "WAKE_ENV",
    "WAKE_FIFO",
    "WakeableTime",
    "Waker",
    "make_fifo",
    "warm_executor_env",
]

#: the environment variable that names the FIFO to the SuperNode and its executor
WAKE_ENV = "POLLINATE_EXECUTOR_WAKE"
#: the FIFO's name in the device's state folder
WAKE_FIFO = "executor.wake"
#: how often the executor asks anyway: a lost wake, a task offered again
IDLE_POLL_S = 1.0


def make_fifo(path: Path) -> Path:
    """A fresh FIFO at ``path`` (whatever was there is replaced), readable and writable by
    its user only."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.mkfifo(path, 0o600)
    return path


def warm_executor_env(state_dir: Path) -> dict[str, str]:
    """The environment a SuperNode and its warm executor share: a fresh wake FIFO in
    ``state_dir``, and the task heartbeat clock the executor's forks keep."""
    return {
        WAKE_ENV: str(make_fifo(state_dir / WAKE_FIFO).resolve()),
        TASK_HEARTBEAT_ENV: f"{WARM_TASK_HEARTBEAT_S:g}",
    }


class Waker:
    """The SuperNode's end: :meth:`wake` writes one byte, never blocks, never raises."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def wake(self) -> bool:
        """Tell the executor to look for a task now; ``False`` when nobody listens (no
        reader yet, the FIFO gone) or the FIFO is already full of unread wakes."""
        for _ in range(2):  # a reader that went away leaves a broken descriptor: reopen once
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                os.write(self._fd, b"\x01")
                return True
            except OSError as err:
                if err.errno == errno.EAGAIN:  # full: the executor has wakes to read already
                    return False
                self.close()
                if err.errno != errno.EPIPE:  # ENXIO (no reader), ENOENT, ...
                    return False
        return False

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class WakeableTime:
    """Stands in for the ``time`` module inside Flower's SuperExec loop: ``sleep`` returns
    early when the SuperNode wakes it; everything else is :mod:`time`'s own.

    The FIFO is opened read-write, so it never reads as closed while the SuperNode restarts.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not stat.S_ISFIFO(path.stat().st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a FIFO")
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``, or until a wake arrives (then take every wake waiting)."""
        if self._poll.poll(max(0.0, seconds) * 1000.0):
            with contextlib.suppress(BlockingIOError):
                while os.read(self._fd, 4096):
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)
