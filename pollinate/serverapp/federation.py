"""The round loop of the ServerApp.

:func:`run_federation` sets the run up or resumes it (:mod:`pollinate.serverapp.setup`), plays
its rounds (:mod:`pollinate.serverapp.rounds`), saving the run after each
(:mod:`pollinate.serverapp.state`), and ends it (:mod:`pollinate.serverapp.finish`): privacy
ledger, report, export and delivery of the final model. Flower's strategy objects do the
configuring and aggregating; the ServerApp owns sampling, validation, accounting and
persistence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from pollinate.config import RunSettings
from pollinate.rundir.records import RoundRecord
from pollinate.rundir.tracking import open_tracker
from pollinate.serverapp import events
from pollinate.serverapp.finish import finish_run
from pollinate.serverapp.rounds import log_round, play_round
from pollinate.serverapp.setup import start_run
from pollinate.serverapp.state import save_round
from pollinate.serverapp.tracing import RoundTracing

__all__ = ["RunResult", "run_federation"]


@dataclass(frozen=True)
class RunResult:
    """What a finished run returns to its caller."""

    run_dir: Path
    history: list[RoundRecord]
    privacy: dict[str, Any]
    model: dict[str, np.ndarray]


def run_federation(grid: Grid, settings: RunSettings, *, threads: int = 1) -> RunResult:
    """Run (or resume) the federation described by ``settings`` on ``grid``.

    ``threads``: torch threads for the server's own work (central evaluation). One where
    clients run beside the server on the same cores; more for the in-process engine.
    """
    run = start_run(grid, settings, threads=threads)
    tracker = open_tracker(run.run_dir, settings.tracking_uri, settings.to_run_config())
    events.emit_start(run.first_round, settings.num_server_rounds)
    with RoundTracing(settings) as tracing:  # each round's spans, with a trace-endpoint
        for rnd in range(run.first_round, settings.num_server_rounds + 1):
            with tracing.round(rnd) as span:
                record = play_round(run, rnd)
                span.record(record)
            if record is None:  # the client-level privacy budget is spent
                break
            run.history.append(record)
            save_round(run, rnd)
            tracker.log_round(record)
            log_round(record)
            events.emit_round(record)
    privacy = finish_run(run, tracker)
    tracker.finish(run.run_dir)
    return RunResult(run_dir=run.run_dir, history=run.history, privacy=privacy, model=run.arrays)
