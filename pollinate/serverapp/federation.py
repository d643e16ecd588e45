"""The round loop of the ServerApp.

:func:`run_federation` sets the run up or resumes it (:mod:`pollinate.serverapp.setup`), plays
its rounds (:mod:`pollinate.serverapp.rounds`), saving the run after each
(:mod:`pollinate.serverapp.state`), and ends it (:mod:`pollinate.serverapp.finish`): privacy
ledger, report, export and delivery of the final model. Flower's strategy objects do the
configuring and aggregating; the ServerApp owns sampling, validation, accounting and
persistence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from pollinate.config import RunSettings, StrategyName
from pollinate.log import logger
from pollinate.rundir.records import RoundRecord
from pollinate.rundir.tracking import open_tracker
from pollinate.serverapp import events
from pollinate.serverapp.fedbuff import BufferedRounds
from pollinate.serverapp.finish import finish_run
from pollinate.serverapp.rounds import play_round
from pollinate.serverapp.setup import start_run
from pollinate.serverapp.state import save_round
from pollinate.serverapp.tracing import RoundTracing
from pollinate.serverapp.transport import PollingGrid, now_of

__all__ = ["RunResult", "log_round", "run_federation"]


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
    grid = PollingGrid.wrap(grid)  # replies (and their objects) seen within 0.5 s, not 3-7 s
    run = start_run(grid, settings, threads=threads)
    tracker = open_tracker(run.run_dir, settings.tracking_uri, settings.to_run_config())
    buffered = BufferedRounds(run) if settings.strategy == StrategyName.FEDBUFF else None
    events.emit_start(run.first_round, settings.num_server_rounds)
    with RoundTracing(settings) as tracing:  # each round's spans, with a trace-endpoint
        for rnd in range(run.first_round, settings.num_server_rounds + 1):
            began = now_of(run.grid)
            with tracing.round(rnd) as span:
                record = buffered.play(rnd) if buffered else play_round(run, rnd)
                span.record(record)
            if record is None:  # the client-level privacy budget is spent
                break
            before = run.history[-1].elapsed_s if run.history else None
            record = replace(record, elapsed_s=(before or 0.0) + now_of(run.grid) - began)
            run.history.append(record)
            save_round(run, rnd)
            if buffered:
                buffered.saved(rnd)
            tracker.log_round(record)
            log_round(record)
            events.emit_round(record)
    privacy = finish_run(run, tracker)
    tracker.finish(run.run_dir)
    return RunResult(run_dir=run.run_dir, history=run.history, privacy=privacy, model=run.arrays)


def log_round(record: RoundRecord) -> None:
    """One log line for a completed round."""
    logger.info(
        "round %d: accuracy %.4f loss %.4f | sampled %d replied %d declined %d rejected %d "
        "failed %d | %.1f s",
        record.server_round, _or_nan(record.accuracy), _or_nan(record.loss), record.sampled,
        record.replied, record.declined, record.rejected, record.failed, record.seconds or 0.0,
    )  # fmt: skip


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
