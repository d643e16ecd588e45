"""In-process observers of a run (the CLI's progress bar, tests).

The ServerApp runs in the CLI's process under ``pollinate simulate``; under ``flwr run`` it
runs elsewhere and nobody listens, which is fine: everything also lands in the run directory.
"""

from __future__ import annotations

import threading
from typing import Protocol

from pollinate.rundir.records import RoundRecord

__all__ = ["RunListener", "add_listener", "emit_round", "emit_start", "remove_listener"]


class RunListener(Protocol):
    """Receives progress of a run."""

    def on_start(self, first_round: int, num_rounds: int) -> None: ...

    def on_round(self, record: RoundRecord) -> None: ...


_lock = threading.Lock()
_listeners: list[RunListener] = []


def add_listener(listener: RunListener) -> None:
    """Register ``listener`` for runs started in this process."""
    with _lock:
        _listeners.append(listener)


def remove_listener(listener: RunListener) -> None:
    """Stop notifying ``listener``."""
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def emit_start(first_round: int, num_rounds: int) -> None:
    """Tell listeners a run starts (or resumes) at ``first_round``."""
    with _lock:
        targets = list(_listeners)
    for listener in targets:
        listener.on_start(first_round, num_rounds)


def emit_round(record: RoundRecord) -> None:
    """Tell listeners a round completed."""
    with _lock:
        targets = list(_listeners)
    for listener in targets:
        listener.on_round(record)
