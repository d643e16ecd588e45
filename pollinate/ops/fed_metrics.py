"""Prometheus metrics of the running federation, read from the run directories at scrape time.

The ServerApp runs in a Flower process of its own and writes ``RUN_DIR/metrics.json`` (one
record per round) and ``RUN_DIR/privacy.json`` atomically after every round;
``STATE_DIR/runs.json`` maps run ids to run directories. :class:`FederationCollector` reads
those small files on every scrape, so the exporter holds no state of the run and never misses
a round. A missing, unreadable or malformed file never fails a scrape: that run is skipped (or
reported without the part that file gives) and ``pollinate_federation_scrape_errors_total``
counts it. Names (label ``run_id`` on all but the last):

- ``pollinate_federation_round``: last completed round (``0`` before the first one)
- ``pollinate_federation_target_rounds``: ``num-server-rounds`` of the run (from run.json)
- ``pollinate_federation_last_round_clients{outcome}``: clients of the last completed round,
  ``outcome`` = ``sampled``, ``replied``, ``declined``, ``rejected``, ``failed``
- ``pollinate_federation_clients_total{outcome}``: the same, summed over all rounds (counter)
- ``pollinate_federation_last_round_duration_seconds``: wall-clock duration of the last round
- ``pollinate_federation_round_duration_seconds``: histogram of every round's duration
- ``pollinate_federation_accuracy`` / ``pollinate_federation_loss``: central evaluation after
  the last round (round 0: the initial model)
- ``pollinate_federation_metric{name}``: every central-evaluation metric of the task (macro F1,
  AUC, MAE, RMSE, MAPE, a user's metrics) after the last round
- ``pollinate_federation_max_epsilon``: sample-level epsilon, the largest over clients
- ``pollinate_federation_client_level_epsilon``: client-level epsilon (when enabled)
- ``pollinate_federation_last_round_timestamp_seconds``: when metrics.json was last written
- ``pollinate_federation_scrape_errors_total{file}``: files that could not be read (counter)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pollinate.errors import ConfigError, PollinateError
from pollinate.ops.runs import RUNS_FILE
from pollinate.rundir.records import RoundRecord

__all__ = ["DURATION_BUCKETS", "OUTCOMES", "FederationCollector", "serve_federation_metrics"]

logger = logging.getLogger("pollinate")

#: The client outcomes of a round, as counted in metrics.json.
OUTCOMES = ("sampled", "replied", "declined", "rejected", "failed")
#: Upper bounds (seconds) of the round-duration histogram; rounds wait up to ``round-timeout``.
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class _UnreadableError(Exception):
    """A file exists but cannot be read or does not hold what it should."""

    def __init__(self, file: str, path: Path, detail: object) -> None:
        super().__init__(f"{path}: {detail}")
        self.file = file


@dataclass(frozen=True)
class _Run:
    """What one scrape reads about one run."""

    run_id: str
    history: list[RoundRecord]  # empty before metrics.json exists
    target_rounds: int | None
    max_epsilon: float | None
    client_level_epsilon: float | None
    written_at: float | None  # mtime of metrics.json


def _load(path: Path, file: str) -> Any:
    """The parsed JSON of ``path``, or None when it does not exist."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _UnreadableError(file, path, err) from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise _UnreadableError(file, path, err) from err


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _section(mapping: object, *keys: str) -> Mapping[str, object]:
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, Mapping) else None
    return mapping if isinstance(mapping, Mapping) else {}


class FederationCollector(Collector):
    """Federation metrics of the runs in ``STATE_DIR/runs.json``, read at every scrape.

    ``max_runs``: only the newest runs (by start time), all by default. Run ids that share a
    run directory (a resumed run) are one run, under the newest id.
    """

    def __init__(self, state_dir: Path, *, max_runs: int | None = None) -> None:
        if max_runs is not None and max_runs < 1:
            raise ConfigError(f"max_runs must be at least 1 (or None for all), got {max_runs}")
        self.state_dir = Path(state_dir)
        self.max_runs = max_runs
        self._errors: dict[str, int] = {}
        self._lock = threading.Lock()  # scrapes run on server threads, possibly at once

    def collect(self) -> Iterator[Metric]:
        """Read every run's files now and yield the metric families; never raises."""
        runs: list[_Run] = []
        for run_id, run_dir in self._run_dirs():
            try:
                runs.append(self._read_run(run_id, run_dir))
            except _UnreadableError as err:
                self._count_error(err, run_id)
        yield from _families(runs)
        errors = CounterMetricFamily(
            "pollinate_federation_scrape_errors",
            "Run files that could not be read or parsed at a scrape",
            labels=["file"],
        )
        with self._lock:
            for file, count in sorted(self._errors.items()):
                errors.add_metric([file], count)
        yield errors

    def _count_error(self, err: _UnreadableError, run_id: str | None) -> None:
        logger.debug("federation metrics: run %s: %s", run_id, err)
        with self._lock:
            self._errors[err.file] = self._errors.get(err.file, 0) + 1

    def _run_dirs(self) -> list[tuple[str, Path]]:
        path = self.state_dir / RUNS_FILE
        try:
            runs = _load(path, RUNS_FILE)
            if runs is not None and not isinstance(runs, dict):
                raise _UnreadableError(RUNS_FILE, path, "not a JSON object")
        except _UnreadableError as err:
            self._count_error(err, None)
            return []
        found: list[tuple[str, str, Path]] = []
        for run_id, entry in (runs or {}).items():
            run_dir = entry.get("run_dir") if isinstance(entry, dict) else None
            if not isinstance(run_dir, str):
                self._count_error(_UnreadableError(RUNS_FILE, path, "entry has no run_dir"), run_id)
                continue
            found.append((str(entry.get("started", "")), run_id, Path(run_dir)))
        found.sort(reverse=True)  # ISO times in UTC: newest first
        # `pollinate server resume` starts a new run id in the same run directory: only the
        # newest id of a directory is exported, or its rounds would be counted twice.
        newest: dict[Path, str] = {}
        for _, run_id, run_dir in found:
            newest.setdefault(run_dir, run_id)
        return [(run_id, run_dir) for run_dir, run_id in newest.items()][: self.max_runs]

    def _read_run(self, run_id: str, run_dir: Path) -> _Run:
        metrics_path = run_dir / "metrics.json"
        rows = _load(metrics_path, "metrics.json")
        written_at = None
        history: list[RoundRecord] = []
        if rows is not None:
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise _UnreadableError("metrics.json", metrics_path, "not a list of round records")
            try:
                history = [RoundRecord.from_dict(r) for r in rows]
                written_at = metrics_path.stat().st_mtime
            except (PollinateError, OSError) as err:
                raise _UnreadableError("metrics.json", metrics_path, err) from err
        history.sort(key=lambda r: r.server_round)

        # The other two files only add to what metrics.json says: a bad one drops its part.
        target = None
        try:
            config = _load(run_dir / "run.json", "run.json")
            value = _section(config, "settings").get("num-server-rounds")
            target = value if isinstance(value, int) and not isinstance(value, bool) else None
        except _UnreadableError as err:
            self._count_error(err, run_id)
        summary: Mapping[str, object] = {}
        try:
            summary = _section(_load(run_dir / "privacy.json", "privacy.json"), "summary")
        except _UnreadableError as err:
            self._count_error(err, run_id)
        max_eps = _number(_section(summary, "sample_level").get("max_epsilon"))
        client_eps = _number(_section(summary, "client_level").get("epsilon"))
        if history:  # privacy.json missing or without data: the last round's record
            max_eps = history[-1].max_epsilon if max_eps is None else max_eps
            client_eps = history[-1].client_level_epsilon if client_eps is None else client_eps
        return _Run(run_id, history, target, max_eps, client_eps, written_at)


def _families(runs: list[_Run]) -> Iterator[Metric]:
    """One family per metric name, with a sample per run (and outcome)."""
    run = ["run_id"]

    def gauge(name: str, doc: str, labels: list[str] = run) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"pollinate_federation_{name}", doc, labels=labels)

    rounds = gauge("round", "Last completed server round (0 before the first)")
    target = gauge("target_rounds", "Server rounds the run was started with")
    last_clients = gauge(
        "last_round_clients", "Clients of the last completed round by outcome",
        [*run, "outcome"],
    )  # fmt: skip
    clients = CounterMetricFamily(
        "pollinate_federation_clients", "Clients by outcome, summed over all rounds",
        labels=[*run, "outcome"],
    )  # fmt: skip
    last_seconds = gauge("last_round_duration_seconds", "Wall-clock duration of the last round")
    seconds = HistogramMetricFamily(
        "pollinate_federation_round_duration_seconds", "Wall-clock duration of each round",
        labels=run,
    )  # fmt: skip
    accuracy = gauge("accuracy", "Central test accuracy after the last round")
    loss = gauge("loss", "Central test loss after the last round")
    task_metric = gauge(
        "metric", "Each central-evaluation metric after the last round (macro F1, AUC, MAE, "
        "RMSE, MAPE, the user's)", [*run, "name"],
    )  # fmt: skip
    max_eps = gauge("max_epsilon", "Sample-level epsilon, the largest over clients so far")
    client_eps = gauge("client_level_epsilon", "Client-level epsilon after the last round")
    written = gauge("last_round_timestamp_seconds", "Unix time metrics.json was last written")
    for r in runs:
        rid = [r.run_id]
        trained = [rec for rec in r.history if rec.server_round > 0]
        last = r.history[-1] if r.history else None
        rounds.add_metric(rid, last.server_round if last else 0)
        if r.target_rounds is not None:
            target.add_metric(rid, r.target_rounds)
        for outcome in OUTCOMES:
            if trained:
                last_clients.add_metric([*rid, outcome], getattr(trained[-1], outcome))
            clients.add_metric([*rid, outcome], sum(getattr(rec, outcome) for rec in trained))
        durations = [rec.seconds for rec in trained if rec.seconds is not None]
        if trained and trained[-1].seconds is not None:
            last_seconds.add_metric(rid, trained[-1].seconds)
        buckets = [(repr(b), sum(d <= b for d in durations)) for b in DURATION_BUCKETS]
        seconds.add_metric(rid, [*buckets, ("+Inf", len(durations))], sum(durations))
        for family, value in (
            (accuracy, last.accuracy if last else None),
            (loss, last.loss if last else None),
            (max_eps, r.max_epsilon),
            (client_eps, r.client_level_epsilon),
            (written, r.written_at),
        ):
            if value is not None:
                family.add_metric(rid, value)
        for name, number in sorted(((last.metrics if last else None) or {}).items()):
            task_metric.add_metric([*rid, name], number)
    yield from (rounds, target, last_clients, clients, last_seconds, seconds, accuracy, loss,
                task_metric, max_eps, client_eps, written)  # fmt: skip


def serve_federation_metrics(
    state_dir: Path, host: str = "127.0.0.1", port: int = 0, *, max_runs: int | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve the federation's metrics on ``http://HOST:PORT/metrics`` from a daemon thread.

    ``port=0`` takes a free port (``server.server_port`` says which). Stop it with
    ``server.shutdown(); server.server_close(); thread.join()``.

    Raises:
        ConfigError: If the port is out of range or cannot be listened on.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port must be 0..65535, got {port}")
    registry = CollectorRegistry()
    registry.register(FederationCollector(state_dir, max_runs=max_runs))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {host}:{port} (federation metrics): {err.strerror or err}; "
            "pick another --metrics-port"
        ) from err
    return server, thread
