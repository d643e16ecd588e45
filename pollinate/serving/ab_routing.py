"""A/B/n experiments on live traffic: the split, the answers remembered, feedback and state.

* **Split**: a request to an experiment's model that names no version goes to one variant.
  With the user header (``x-user-id``), ``sha256(experiment name, 0 byte, user id)`` read as
  a number in [0, 1) picks the variant whose share of the cumulative weights holds it, so a
  user keeps one variant for the whole experiment (and a new experiment, a new salt, shuffles
  users afresh); without it, a random draw per request. The variant is a model of the
  repository at its current version (canary roll-out included) or at a version the roll-out
  policy keeps loaded for it (``rollout.py``); :class:`~pollinate.serving.models.ModelManager`
  routes and runs the request as if it had named that model and version. REST only: gRPC
  requests are served as if no experiment ran.
* **Answers**: request id -> (variant, predicted classes), the latest ``memory`` of them.
  A class is the arg-max of the model's first output (one column: logit > 0).
* **Feedback**: ``{"id", "label"}`` scores the answer 1 or 0 (a request of several rows: the
  fraction right; ``label`` is then a list), ``{"id", "reward"}`` records the number; each
  answer takes one outcome. :class:`~pollinate.serving.abtest.SequentialTest` updates at once.
* **State**: each experiment's test in ``STATE_DIR/NAME.json``, written atomically at most
  every ``save-interval-s`` and when the server stops, and read back at start (only for the
  same variants and test settings: otherwise a :class:`ConfigError`; rename the experiment
  to start over). ``pollinate serve ab status`` reads these files (:func:`read_status`).
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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError, DataError
from pollinate.log import logger
from pollinate.serving.ab_config import ABSettings, ExperimentSettings
from pollinate.serving.abtest import SequentialTest, VariantReport
from pollinate.serving.metrics import ServingMetrics
from pollinate.serving.versions import LoadedVersion, ModelNotFoundError

__all__ = ["Assignment", "ExperimentStatus", "Experiments", "read_status"]

STATE_FORMAT = "pollinate.ab/1"


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


@dataclass
class _Answer:
    arm: int
    classes: np.ndarray | None
    settled: bool = False


def bucket(salt: str, user: str) -> float:
    """``sha256(salt, 0 byte, user)`` as a number in [0, 1): the same user, the same number."""
    digest = hashlib.sha256(f"{salt}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _classes(output: np.ndarray) -> np.ndarray:
    flat = output.reshape(output.shape[0], -1)
    return flat.argmax(axis=1) if flat.shape[1] > 1 else (flat[:, 0] > 0).astype(np.int64)


def _outcome(answer: _Answer, body: dict[str, Any]) -> float:
    """The outcome the feedback gives ``answer``: 1/0 (the fraction right) or the reward."""
    if "reward" in body:
        reward = body["reward"]
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise FeedbackError(400, "invalid", f"reward must be a number, got {reward!r}")
        if not math.isfinite(reward):
            raise FeedbackError(400, "invalid", f"reward must be finite, got {reward!r}")
        return float(reward)
    assert answer.classes is not None
    label, rows = body["label"], len(answer.classes)
    labels = label if isinstance(label, list) else [label]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in labels) or len(labels) != rows:
        raise FeedbackError(
            400, "invalid", f"label must be a class number (a list of {rows} for a request of "
            f"{rows} rows), got {label!r}",
        )  # fmt: skip
    return float(np.mean(answer.classes == np.asarray(labels)))


class _Experiment:
    def __init__(self, settings: ExperimentSettings, test: SequentialTest, memory: int) -> None:
        self.settings = settings
        self.test = test
        self._cumulative = list(itertools.accumulate(v.weight for v in settings.variants))
        self._memory = memory
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._rng = random.Random()
        self.outputs = [""] * len(settings.variants)  # each variant's first output
        self.dirty = False

    def assign(self, user: str | None) -> Assignment:
        u = bucket(self.settings.name, user) if user else self._rng.random()
        arm = min(bisect.bisect_right(self._cumulative, u), len(self._cumulative) - 1)
        v = self.settings.variants[arm]
        return Assignment(self.settings.name, arm, v.name, v.model, v.version)

    def remember(self, request_id: str, arm: int, outputs: dict[str, np.ndarray]) -> None:
        accuracy = self.settings.metric == "accuracy"
        classes = _classes(outputs[self.outputs[arm]]) if accuracy else None
        self._answers[request_id] = _Answer(arm, classes)
        self._answers.move_to_end(request_id)
        if len(self._answers) > self._memory:
            self._answers.popitem(last=False)

    def record(self, body: dict[str, Any]) -> tuple[int, float]:
        """Score the answer ``body["id"]``; its arm and outcome."""
        request_id, s = body["id"], self.settings
        answer = self._answers.get(request_id)
        if answer is None:
            raise FeedbackError(
                404, "unknown_id", f"A/B experiment {s.name!r} remembers no answer with id "
                f"{request_id!r} (never answered by it, or older than the last "
                f"{self._memory} answers)",
            )  # fmt: skip
        if answer.settled:
            raise FeedbackError(409, "duplicate", f"request {request_id!r} has feedback already")
        value = _outcome(answer, body)
        answer.settled = True
        self.test.observe(answer.arm, value)
        self.dirty = True
        return answer.arm, value

    def state(self) -> dict[str, Any]:
        s = self.settings
        return {
            "format": STATE_FORMAT, "experiment": s.name, "model": s.model, "metric": s.metric,
            "margin": s.margin, "variants": [asdict(v) for v in s.variants],
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "test": self.test.to_dict(),
        }  # fmt: skip


def _identity(state: dict[str, Any]) -> tuple[Any, ...]:
    """What must not change while an experiment runs: its arms, metric and test settings."""
    test = state["test"]
    arms = [(v["name"], v["model"], v["version"]) for v in state["variants"]]
    return state["metric"], arms, test["alpha"], test["mixture_sd"]


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, not {STATE_FORMAT!r}")
        SequentialTest.from_dict(state["test"])
        _identity(state)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"A/B state file {path} is unreadable: {err}") from err
    return dict(state)


class Experiments:
    """Every A/B experiment of one server, by the model whose requests it splits."""

    def __init__(self, settings: ABSettings, metrics: ServingMetrics) -> None:
        """Read each experiment's saved state (ConfigError if it was another experiment)."""
        self.settings = settings
        self._metrics = metrics
        self._by_model: dict[str, _Experiment] = {}
        for s in settings.experiments:
            test = SequentialTest(
                len(s.variants), alpha=s.alpha, mixture_sd=s.mixture_sd, min_samples=s.min_samples
            )
            path = self._path(s.name)
            if path.exists():
                saved = _read_state(path)
                fresh = _Experiment(s, test, 1).state()
                if _identity(saved) != _identity(fresh):
                    raise ConfigError(
                        f"[ab.{s.name}] differs from the experiment saved in {path} (variants, "
                        "metric, alpha or mixture-sd); rename the experiment to start a new one"
                    )
                test = SequentialTest.from_dict(saved["test"])
                test.min_samples = s.min_samples
            self._by_model[s.model] = _Experiment(s, test, settings.memory)
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


@dataclass(frozen=True)
class ExperimentStatus:
    """One saved experiment, as ``pollinate serve ab status`` shows it."""

    name: str
    model: str
    metric: str
    alpha: float
    margin: float
    saved: str
    targets: dict[str, str]  # variant -> model or model/version
    weights: dict[str, float]
    reports: list[VariantReport]


def read_status(state_dir: Path) -> list[ExperimentStatus]:
    """Every experiment saved in ``state_dir``, with the test's report now."""
    if not Path(state_dir).is_dir():
        raise ConfigError(
            f"A/B state directory {state_dir} does not exist; pass the server's [ab] state-dir "
            "(or its --config file)"
        )
    out = []
    for path in sorted(Path(state_dir).glob("*.json")):
        state = _read_state(path)
        test = SequentialTest.from_dict(state["test"])
        variants = state["variants"]
        names = [v["name"] for v in variants]
        out.append(
            ExperimentStatus(
                name=state["experiment"], model=state["model"], metric=state["metric"],
                alpha=test.alpha, margin=float(state["margin"]), saved=str(state["saved"]),
                targets={v["name"]: v["model"] + (f"/{v['version']}" if v["version"] else "")
                         for v in variants},
                weights={v["name"]: float(v["weight"]) for v in variants},
                reports=test.report(names, float(state["margin"])),
            )
        )  # fmt: skip
    if not out:
        raise ConfigError(f"A/B state directory {state_dir} holds no experiment (*.json) yet")
    return out
