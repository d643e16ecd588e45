"""A/B/n experiments on live traffic: the split, the answers remembered, feedback and state.

* **Split**: a request to an experiment's model that names no version goes to one variant.
  With the user header (``x-user-id``), ``sha256(experiment name, 0 byte, user id)`` read as
  a number in [0, 1) picks the variant whose share of the cumulative weights holds it, so a
  user keeps one variant for the whole experiment (and a new experiment, a new salt, shuffles
  users afresh); without it, a random draw per request. The variant is a model of the
  repository at its current version (canary roll-out included) or at a version the roll-out
  policy keeps loaded for it (``rollout.py``); :class:`~pollinate.serving.models.ModelManager`
  routes and runs the request as if it had named that model and version (gRPC too, by a
  metadata key).
* **Answers**: request id -> (variant, predicted classes), about the latest ``memory`` of
  them, in the experiment's outcome store (``ab_store.py``, ``STATE_DIR/NAME.sqlite``) that
  every worker of ``--workers N`` shares. A class is the arg-max of the model's first output
  (one column: logit > 0).
* **Feedback**: ``{"id", "label"}`` scores the answer 1 or 0 (a request of several rows: the
  fraction right; ``label`` is then a list), ``{"id", "reward"}`` records the number; each
  answer takes one outcome, whichever worker answered it and whichever gets the feedback.
  Each worker replays the store's outcomes into its
  :class:`~pollinate.serving.abtest.SequentialTest` in the store's order (at each feedback
  it takes and every ``save-interval-s``), so all workers hold the same test.
* **State**: each experiment's test in ``STATE_DIR/NAME.json`` with the number of the last
  outcome it counts, written atomically at most every ``save-interval-s`` and when the server
  stops, and read back at start (only for the same variants and test settings: otherwise a
  :class:`ConfigError`; rename the experiment to start over); the outcomes after it are
  replayed from the store. ``pollinate serve ab status`` does the same (:func:`read_status`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError, DataError
from pollinate.log import logger
from pollinate.serving.ab_config import ABSettings, ExperimentSettings
from pollinate.serving.ab_store import STATE_FORMAT, OutcomeStore, Recorded, identity, read_state
from pollinate.serving.abtest import SequentialTest
from pollinate.serving.metrics import ServingMetrics
from pollinate.serving.versions import LoadedVersion, ModelNotFoundError

__all__ = ["Assignment", "Experiments", "check_state"]


@dataclass(frozen=True)
class Assignment:
    """The variant one request goes to."""

    experiment: str
    arm: int
    variant: str
    model: str
    version: int | None


class FeedbackError(Exception):
    """Feedback refused: its HTTP ``status`` and metric ``reason``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def bucket(salt: str, user: str) -> float:
    """``sha256(salt, 0 byte, user)`` as a number in [0, 1): the same user, the same number."""
    digest = hashlib.sha256(f"{salt}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _classes(output: np.ndarray) -> np.ndarray:
    flat = output.reshape(output.shape[0], -1)
    return flat.argmax(axis=1) if flat.shape[1] > 1 else (flat[:, 0] > 0).astype(np.int64)


def _outcome(classes: list[int] | None, body: dict[str, Any]) -> float:
    """The outcome the feedback gives ``answer``: 1/0 (the fraction right) or the reward."""
    if "reward" in body:
        reward = body["reward"]
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise FeedbackError(400, "invalid", f"reward must be a number, got {reward!r}")
        if not math.isfinite(reward):
            raise FeedbackError(400, "invalid", f"reward must be finite, got {reward!r}")
        return float(reward)
    assert classes is not None
    label, rows = body["label"], len(classes)
    labels = label if isinstance(label, list) else [label]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in labels) or len(labels) != rows:
        raise FeedbackError(
            400, "invalid", f"label must be a class number (a list of {rows} for a request of "
            f"{rows} rows), got {label!r}",
        )  # fmt: skip
    return float(np.mean(np.asarray(classes) == np.asarray(labels)))


class _Experiment:
    """``test`` counts the outcomes of ``store`` up to number ``seq``."""

    def __init__(
        self, settings: ExperimentSettings, test: SequentialTest, store: OutcomeStore | None,
        memory: int, seq: int = 0,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.test = test
        self.store = store
        self.seq = seq
        self._cumulative = list(itertools.accumulate(v.weight for v in settings.variants))
        self._memory = memory
        self._rng = random.Random()
        self.outputs = [""] * len(settings.variants)  # each variant's first output
        self.dirty = False

    def assign(self, user: str | None) -> Assignment:
        u = bucket(self.settings.name, user) if user else self._rng.random()
        arm = min(bisect.bisect_right(self._cumulative, u), len(self._cumulative) - 1)
        v = self.settings.variants[arm]
        return Assignment(self.settings.name, arm, v.name, v.model, v.version)

    def remember(self, request_id: str, arm: int, outputs: dict[str, np.ndarray]) -> None:
        assert self.store is not None
        accuracy = self.settings.metric == "accuracy"
        classes = _classes(outputs[self.outputs[arm]]).tolist() if accuracy else None
        self.store.remember(request_id, arm, classes)

    def catch_up(self, outcomes: list[Recorded]) -> None:
        """Count the outcomes numbered after ``seq``, in order."""
        for seq, arm, value in outcomes:
            if seq > self.seq:
                self.test.observe(arm, value)
                self.seq, self.dirty = seq, True

    def record(self, body: dict[str, Any]) -> tuple[int, float]:
        """Score the answer ``body["id"]``; its arm and outcome."""
        request_id, s = body["id"], self.settings
        assert self.store is not None
        answer = self.store.answer(request_id)
        if answer is None:
            raise FeedbackError(
                404, "unknown_id", f"A/B experiment {s.name!r} remembers no answer with id "
                f"{request_id!r} (never answered by it, or older than the last "
                f"{self._memory} answers)",
            )  # fmt: skip
        arm, classes, settled = answer
        duplicate = FeedbackError(409, "duplicate", f"request {request_id!r} has feedback already")
        if settled:
            raise duplicate
        value = _outcome(classes, body)
        if not self.store.settle(request_id, arm, value):  # another worker was quicker
            raise duplicate
        self.catch_up(self.store.outcomes(self.seq))
        return arm, value

    def state(self) -> dict[str, Any]:
        s = self.settings
        return {
            "format": STATE_FORMAT, "experiment": s.name, "model": s.model, "metric": s.metric,
            "margin": s.margin, "variants": [asdict(v) for v in s.variants],
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seq": self.seq, "test": self.test.to_dict(),
        }  # fmt: skip


def _open(settings: ABSettings, s: ExperimentSettings) -> _Experiment:
    """The experiment's test as saved, with the outcomes recorded since replayed."""
    test = SequentialTest(
        len(s.variants), alpha=s.alpha, mixture_sd=s.mixture_sd, min_samples=s.min_samples
    )
    path, seq = settings.state_dir / f"{s.name}.json", 0
    store = OutcomeStore(path.with_suffix(".sqlite"), memory=settings.memory)
    claimed = json.dumps(identity(_Experiment(s, test, None, 1).state()))
    saved = read_state(path) if path.exists() else None
    if store.claim(claimed) != claimed or (
        saved is not None and json.dumps(identity(saved)) != claimed
    ):
        store.close()
        raise ConfigError(
            f"[ab.{s.name}] differs from the experiment saved in {path.parent} (variants, "
            "metric, alpha or mixture-sd); rename the experiment to start a new one"
        )
    if saved is not None:
        test = SequentialTest.from_dict(saved["test"])
        test.min_samples = s.min_samples
        seq = int(saved.get("seq", 0))
    experiment = _Experiment(s, test, store, settings.memory, seq)
    if seq > store.last_seq():
        store.close()
        raise DataError(
            f"A/B state file {path} counts outcomes up to number {seq}, but "
            f"{store.path} holds fewer; restore that file or rename the experiment"
        )
    experiment.catch_up(store.outcomes(seq))
    return experiment


def check_state(settings: ABSettings) -> None:
    """Open each experiment's records once and check them against its settings (ConfigError
    or DataError): the supervisor of ``--workers`` does, for one error instead of one per
    worker."""
    for s in settings.experiments:
        store = _open(settings, s).store
        assert store is not None
        store.close()


class Experiments:
    """Every A/B experiment of one server, by the model whose requests it splits."""

    def __init__(self, settings: ABSettings, metrics: ServingMetrics) -> None:
        """Read each experiment's saved state (ConfigError if it was another experiment)."""
        self.settings = settings
        self._metrics = metrics
        self._by_model: dict[str, _Experiment] = {}
        for s in settings.experiments:
            self._by_model[s.model] = _open(settings, s)
        self._by_name = {exp.settings.name: exp for exp in self._by_model.values()}
        self._stop = asyncio.Event()
        self._saver: asyncio.Task[None] | None = None

    def _path(self, name: str) -> Path:
        return self.settings.state_dir / f"{name}.json"

    def check(self, get: Callable[[str, int | None], LoadedVersion]) -> None:
        """Every variant is served and takes the same inputs as its experiment's model
        (``get``: the manager's look-up); ConfigError naming the field if not."""
        for exp in self._by_model.values():
            s = exp.settings
            try:
                inputs = get(s.model, None).spec.inputs
            except ModelNotFoundError as err:
                raise ConfigError(f"[ab.{s.name}] model: {err}") from None
            for i, v in enumerate(s.variants):
                where = f"[ab.{s.name}] variants[{i}] ({v.name}, {v.target})"
                try:
                    spec = get(v.model, v.version).spec
                except ModelNotFoundError as err:
                    raise ConfigError(f"{where}: {err}") from None
                if spec.inputs != inputs:
                    raise ConfigError(
                        f"{where} takes other inputs than {s.model!r}; every variant must "
                        "answer the same requests"
                    )
                exp.outputs[i] = spec.outputs[0].name
            logger.info(
                "A/B experiment %s splits %s: %s", s.name, s.model,
                ", ".join(f"{v.name}={v.target} {100 * v.weight:g}%" for v in s.variants),
            )  # fmt: skip

    # ------------------------------------------------------------------ requests
    def route(self, model: str, user: str | None) -> Assignment | None:
        """The variant a request to ``model`` naming no version goes to (None: no experiment)."""
        exp = self._by_model.get(model)
        return exp.assign(user) if exp is not None else None

    def answered(
        self, assignment: Assignment, request_id: str, outputs: dict[str, np.ndarray]
    ) -> None:
        """Remember which variant answered ``request_id``, and what it predicted."""
        exp = self._by_name[assignment.experiment]
        exp.remember(request_id, assignment.arm, outputs)
        self._metrics.ab_requests.labels(assignment.experiment, assignment.variant).inc()

    def feedback(self, model: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        """Record the outcome in a feedback body; the HTTP status and JSON reply."""
        try:
            status, reply = 200, self._feedback(model, raw)
        except FeedbackError as err:
            self._metrics.ab_rejected.labels(model, err.reason).inc()
            status, reply = err.status, {"error": str(err)}
        return status, reply

    def _feedback(self, model: str, raw: bytes) -> dict[str, Any]:
        exp = self._by_model.get(model)
        if exp is None:
            known = ", ".join(sorted(self._by_model)) or "none"
            raise FeedbackError(
                404, "no_experiment", f"model {model!r} has no A/B experiment "
                f"(models with one: {known})",
            )  # fmt: skip
        metric = exp.settings.metric
        key = "label" if metric == "accuracy" else "reward"
        example = f'{{"id": "REQUEST-ID", "{key}": {1 if key == "label" else 0.5}}}'
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise FeedbackError(400, "invalid", f"feedback must be a JSON object like {example}")
        if key not in body or set(body) - {"id", key}:
            raise FeedbackError(
                400, "invalid", f"A/B experiment {exp.settings.name!r} measures {metric}: "
                f"send {example}",
            )  # fmt: skip
        arm, value = exp.record(body)
        variant = exp.settings.variants[arm].name
        self._metrics.ab_feedback.labels(exp.settings.name, variant).inc()
        return {"id": body["id"], "experiment": exp.settings.name, "variant": variant,
                "outcome": value, "n": exp.test.arms[arm].n}  # fmt: skip

    # ------------------------------------------------------------------ state
    def start(self) -> None:
        """Save the state every ``save-interval-s`` (on the running event loop) until closed."""
        if self._by_model:
            self._saver = asyncio.get_running_loop().create_task(self._save_loop())

    async def _save_loop(self) -> None:
        stopping = False
        while not stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.save_interval_s)
            stopping = self._stop.is_set()  # then this is the last save
            for exp in self._by_model.values():  # what the other workers took
                assert exp.store is not None
                exp.catch_up(exp.store.outcomes(exp.seq))
            texts = self._snapshot()
            if texts:
                await asyncio.to_thread(self._write, texts)

    def _snapshot(self) -> dict[Path, str]:
        out = {}
        for exp in self._by_model.values():
            if exp.dirty:
                exp.dirty = False
                out[self._path(exp.settings.name)] = json.dumps(exp.state(), indent=1) + "\n"
        return out

    @staticmethod
    def _write(texts: dict[Path, str]) -> None:
        for path, text in texts.items():
            try:
                atomic_write_text(path, text)
            except OSError as err:
                logger.error("cannot save the A/B state %s: %s", path, err)

    async def close(self) -> None:
        """Save what changed since the last save, and stop saving."""
        self._stop.set()
        if self._saver is not None:
            await self._saver
        for exp in self._by_model.values():
            if exp.store is not None:
                exp.store.close()
