"""A run's mirror in MLflow: settings, per-round metrics and the final files, never in the way.

:func:`open_tracker` returns a :class:`Tracker` for a run directory. Tracking is on by
default when mlflow is installed: a run that names no tracking URI logs into the embedded
store ``sqlite:///CWD/mlflow.db`` (no server; ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows it). ``tracking-uri = "off"`` (``--tracking-uri off``) or
``POLLINATE_TRACKING=off`` in the environment turns it off (:func:`resolve_uri`); then it is a
:class:`NullTracker` and mlflow is not even imported. Otherwise an :class:`MlflowTracker`,
whose calls only put work on a bounded queue. One background thread, started with the first
round's metrics (so mlflow, 1-2 s to import, is never imported before the first round has
run, and never on the run's own thread), takes the work in order,
retries each call with back-off and, when the tracking server cannot be reached or keeps
failing, logs one warning on the ``pollinate`` logger and drops what is left: tracking never
fails or slows a training run. The MLflow run id is kept in ``RUN_DIR/mlflow.json`` (written
atomically), so a resumed run logs into the same MLflow run.

What is logged: the settings as params, each round's metrics with ``step`` = the round
(accuracy, loss, sampled, replied, ..., seconds, the sample-level and client-level epsilons),
and at the end ``summary.md``, the plots, ``privacy.json``, ``metrics.json`` and the final
checkpoint's ``model.safetensors`` as artifacts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_text
from pollinate.log import logger
from pollinate.rundir.records import RoundRecord

__all__ = [
    "DEFAULT_STORE",
    "EXPERIMENT",
    "TRACKING_ENV",
    "TRACKING_FILE",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "mlflow_client",
    "open_tracker",
    "read_tracking_file",
    "resolve_uri",
    "round_metrics",
]

#: The run directory's link to its MLflow run: ``{"tracking_uri": ..., "run_id": ...}``.
TRACKING_FILE = "mlflow.json"
#: The embedded store a run without a tracking URI logs into, in the working folder.
DEFAULT_STORE = "mlflow.db"
#: ``off`` here turns the default off (an explicit tracking URI still tracks).
TRACKING_ENV = "POLLINATE_TRACKING"
_OFF = frozenset({"off", "none", "false", "no", "0"})
#: The MLflow experiment every pollinate run is logged under.
EXPERIMENT = "pollinate"
#: Attempts per call, and the first back-off (doubled after each failure).
ATTEMPTS = 4
BACKOFF_S = 0.5
#: Calls waiting for the thread at most; beyond it a call is dropped (with one warning).
QUEUE_SIZE = 1024
#: How long the end of a run waits for the queue to drain (uploads of the final files).
FINISH_TIMEOUT_S = 120.0

_RECORD_METRICS = (
    "accuracy", "loss", "sampled", "replied", "declined", "refused", "rejected", "failed",
    "train_loss", "train_accuracy", "federated_accuracy", "seconds", "max_epsilon",
    "median_epsilon", "client_level_epsilon",
)  # fmt: skip
_FINAL_FILES = ("summary.md", "privacy.json", "metrics.json")


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` with short HTTP retries (MLflow's defaults wait
    minutes for an unreachable server); mlflow is imported here, never at start-up."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO lines on the run's stderr
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_uri(uri: str) -> str:
    """The tracking URI a run logs to (empty: not tracked): ``uri`` itself; none for ``off``;
    for an empty one, the embedded store ``sqlite:///CWD/mlflow.db`` when mlflow is installed
    and ``$POLLINATE_TRACKING`` is not ``off``."""
    value = uri.strip()
    if value.lower() in _OFF:
        return ""
    if value:
        return value
    if os.environ.get(TRACKING_ENV, "").strip().lower() in _OFF:
        return ""
    if importlib.util.find_spec("mlflow") is None:  # not installed: quietly untracked
        return ""
    return f"sqlite:///{Path.cwd().resolve() / DEFAULT_STORE}"


def read_tracking_file(run_dir: Path) -> dict[str, str]:
    """``RUN_DIR/mlflow.json``, or ``{}`` when the run was never tracked (or it is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / TRACKING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """The numbers of one round, by MLflow metric name (``None`` values left out)."""
    out: dict[str, float] = {}
    for name in _RECORD_METRICS:
        value = getattr(record, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    for name, value in (record.metrics or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.setdefault(f"eval_{name}", float(value))
    return out


class Tracker:
    """What the ServerApp tells tracking; this base does nothing (no tracking URI)."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id, once known (``None``: not tracked)."""
        return None

    def log_round(self, record: RoundRecord) -> None:
        """Log one finished round's metrics (``step`` = its round)."""

    def submit(self, job: Callable[[Any, str], object]) -> None:
        """Run ``job(client, run_id)`` on the tracking thread after what is already queued."""

    def finish(self, run_dir: Path) -> None:
        """Log the run's final files, end the MLflow run and wait (bounded) for the queue."""


class NullTracker(Tracker):
    """No tracking: every call is a no-op."""


class MlflowTracker(Tracker):
    """Tracking into MLflow through one background thread (see the module's docstring)."""

    def __init__(self, run_dir: Path, uri: str, params: Mapping[str, Any]) -> None:
        self._run_dir = Path(run_dir)
        self._uri = uri
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue(QUEUE_SIZE)
        self._client: Any = None
        self._run_id: str | None = None
        self._dead = False
        self._dropped = False
        self._failures = 0
        self._thread = threading.Thread(target=self._work, name="pollinate-tracking", daemon=True)
        self._queue.put(lambda: self._start(dict(params)))  # on the thread, once it starts

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # ------------------------------------------------------------- the run's side
    def log_round(self, record: RoundRecord) -> None:
        metrics = round_metrics(record)
        self._put(lambda: self._log_metrics(metrics, record.server_round))

    def submit(self, job: Callable[[Any, str], object]) -> None:
        self._put(lambda: job(self._client, self._require_run()))

    def finish(self, run_dir: Path) -> None:
        self._put(lambda: self._log_final(Path(run_dir)))
        self._put(lambda: self._client.set_terminated(self._require_run(), "FINISHED"))
        with contextlib.suppress(queue.Full):  # the end, dead or not (a dead thread drains)
            self._queue.put(None, timeout=FINISH_TIMEOUT_S)
        self._thread.join(FINISH_TIMEOUT_S)
        if self._failures > 1:
            logger.warning(
                "tracking: %d calls to %s failed; its MLflow run is incomplete",
                self._failures, self._uri,
            )  # fmt: skip
        if self._thread.is_alive():
            logger.warning(
                "tracking: uploads to %s did not finish in %.0f s; the run is complete, its "
                "MLflow run may lack some files", self._uri, FINISH_TIMEOUT_S,
            )  # fmt: skip

    def _put(self, job: Callable[[], object] | None) -> None:
        if self._dead:
            return
        if self._thread.ident is None:
            self._thread.start()  # the first round's metrics (or the end): mlflow loads now
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            if not self._dropped:
                self._dropped = True
                logger.warning("tracking: %s is too slow; some metrics are not logged", self._uri)

    # ---------------------------------------------------------- the thread's side
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._dead:
                continue
            self._attempt(job)

    def _attempt(self, job: Callable[[], object]) -> None:
        """Run ``job``, retried with back-off (once only after repeated failures)."""
        delay = BACKOFF_S
        attempts = ATTEMPTS if self._failures < 3 else 1
        for attempt in range(1, attempts + 1):
            try:
                job()
                return
            except Exception as err:
                if self._run_id is None:  # the start: the server is not there
                    self._dead = True
                    logger.warning(
                        "tracking: cannot reach %s (%s); the run goes on untracked",
                        self._uri, _one_line(err),
                    )  # fmt: skip
                    return
                if attempt == attempts:
                    self._failures += 1
                    log = logger.warning if self._failures == 1 else logger.debug
                    log(
                        "tracking: a call to %s failed (%s); the run goes on", self._uri,
                        _one_line(err),
                    )  # fmt: skip
                    return
                time.sleep(delay)
                delay *= 2

    def _require_run(self) -> str:
        if self._run_id is None:
            raise RuntimeError("no MLflow run")
        return self._run_id

    def _start(self, params: dict[str, Any]) -> None:
        self._client = mlflow_client(self._uri)  # imports mlflow, its settings first
        from mlflow.entities import Param

        linked = read_tracking_file(self._run_dir)
        if linked.get("run_id") and linked.get("tracking_uri") == self._uri:
            run_id = linked["run_id"]
            self._client.update_run(run_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name(EXPERIMENT)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self._client.create_experiment(EXPERIMENT)
            )
            run = self._client.create_run(
                experiment_id,
                run_name=self._run_dir.name,
                tags={"pollinate.run": self._run_dir.name, "pollinate.run_dir": str(self._run_dir)},
            )
            run_id = run.info.run_id
            values = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(values), 100):  # MLflow takes at most 100 params a batch
                self._client.log_batch(run_id, params=values[i : i + 100])
            document = {"tracking_uri": self._uri, "run_id": run_id}
            atomic_write_text(self._run_dir / TRACKING_FILE, json.dumps(document, indent=2) + "\n")
        self._run_id = run_id

    def _log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        values = [Metric(k, v, stamp, step) for k, v in metrics.items()]
        self._client.log_batch(self._require_run(), metrics=values)

    def _log_final(self, run_dir: Path) -> None:
        run_id = self._require_run()
        for name in _FINAL_FILES:
            if (run_dir / name).is_file():
                self._client.log_artifact(run_id, str(run_dir / name), "run")
        for plot in sorted(run_dir.glob("*.png")):
            self._client.log_artifact(run_id, str(plot), "run/plots")
        pointer = run_dir / "LATEST"
        if pointer.is_file():
            model = run_dir / pointer.read_text(encoding="utf-8").strip() / "model.safetensors"
            if model.is_file():
                self._client.log_artifact(run_id, str(model), "model")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def open_tracker(run_dir: Path, uri: str, params: Mapping[str, Any]) -> Tracker:
    """A :class:`Tracker` for ``run_dir``: MLflow at :func:`resolve_uri` of ``uri`` (a new
    MLflow run, or the one ``mlflow.json`` names after a resume), or no tracking when that is
    empty. A tracking URI given while mlflow is missing is one warning and no tracking."""
    uri = resolve_uri(uri)
    if not uri:
        return NullTracker()
    if importlib.util.find_spec("mlflow") is None:  # imported on the tracking thread
        logger.warning(
            'tracking-uri is set but mlflow is not installed; pip install "pollinate[tracking]"'
        )
        return NullTracker()
    return MlflowTracker(run_dir, uri, params)
