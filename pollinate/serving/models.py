"""Loaded model versions, request routing, and safe roll-out of new versions.

At start the newest complete version of every model in the repository becomes *current*.
A watcher polls the repository; a version newer than the current one is loaded, warmed
(a batch of one and a full batch through every instance) and validated (output names,
shapes, dtypes, finite values) before it takes any traffic. It then becomes the *canary*:
``canary_percent`` of the requests that name no version go to it. Once it has answered
``min_requests``, its error rate and p95 latency are compared with the current version's
over the same period; it is promoted (the old version drains its queue, then unloads) or
rolled back (it drains and unloads; that version is not tried again until its files change).
Requests are routed when they arrive and never moved, so a swap fails none of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pollinate.errors import PollinateError, RepositoryError
from pollinate.serving.backends import Backend, select_backend
from pollinate.serving.batcher import Batcher, BatchResult
from pollinate.serving.config import ServeSettings
from pollinate.serving.drift import DriftMonitor, DriftReading, DriftSettings, TriggerSink
from pollinate.serving.ledger import RolloutLedger
from pollinate.serving.metrics import ServingMetrics
from pollinate.serving.repository import (
    ModelSpec,
    VersionFiles,
    kserve_datatype,
    model_dirs,
    scan_model,
    scan_repository,
)

__all__ = [
    "InvalidInputError",
    "LoadedVersion",
    "ModelManager",
    "ModelNotFoundError",
    "check_inputs",
]

logger = logging.getLogger("pollinate")

Role = Literal["current", "canary", "draining"]


class InvalidInputError(ValueError):
    """A request does not match the model's metadata (HTTP 400 / INVALID_ARGUMENT)."""


class ModelNotFoundError(LookupError):
    """No such model, or that version is not loaded (HTTP 404 / NOT_FOUND)."""


def check_inputs(
    spec: ModelSpec, tensors: dict[str, np.ndarray], *, max_batch: int
) -> tuple[dict[str, np.ndarray], int]:
    """Check tensors against the model's inputs; return them in model order and the batch size."""
    expected = {t.name for t in spec.inputs}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise InvalidInputError(
            f"unexpected input {unknown[0]!r}; model {spec.name!r} takes "
            + ", ".join(repr(t.name) for t in spec.inputs)
        )
    batch: int | None = None
    out: dict[str, np.ndarray] = {}
    for meta in spec.inputs:
        if meta.name not in tensors:
            raise InvalidInputError(
                f"missing input {meta.name!r} ({meta.datatype} {list(meta.shape)})"
            )
        arr = tensors[meta.name]
        shape = arr.shape
        rows = int(shape[0]) if shape else 0
        problem = None
        if arr.dtype != meta.dtype:
            problem = f"datatype {kserve_datatype(arr.dtype)}"
        elif len(shape) != len(meta.shape) or shape[1:] != meta.shape[1:]:
            problem = f"shape {list(shape)}"
        elif not 1 <= rows <= max_batch:
            problem = f"a batch of {rows}"
        if problem is not None:
            raise InvalidInputError(
                f"input {meta.name!r}: expected {meta.datatype} with shape {list(meta.shape)} "
                f"(batch 1..{max_batch}), got {problem}"
            )
        if batch is not None and rows != batch:
            raise InvalidInputError(f"inputs have different batch sizes ({batch} and {rows})")
        batch = rows
        out[meta.name] = np.ascontiguousarray(arr)
    assert batch is not None
    return out, batch


@dataclass
class _Window:
    """Requests, failures and latencies of one version since the canary started."""

    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=5000))

    def p95(self) -> float:
        return (
            float(np.percentile(np.fromiter(self.latencies, float), 95)) if self.latencies else 0.0
        )

    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class _VersionMetrics:
    """The metric children of one version, looked up once (``labels()`` costs per call)."""

    http_requests: Any
    grpc_requests: Any
    predictions: Any
    latency: Any
    queue: Any

    @classmethod
    def of(cls, metrics: ServingMetrics, model: str, version: int) -> _VersionMetrics:
        labels = (model, str(version))
        return cls(
            http_requests=metrics.requests.labels(*labels, "http"),
            grpc_requests=metrics.requests.labels(*labels, "grpc"),
            predictions=metrics.predictions.labels(*labels),
            latency=metrics.latency.labels(*labels),
            queue=metrics.queue.labels(*labels),
        )


@dataclass
class LoadedVersion:
    """One version in service: its batcher, metrics children and drift monitor."""

    spec: ModelSpec
    files: VersionFiles
    batcher: Batcher
    backend: str
    device: str
    max_batch: int
    drift: DriftMonitor | None
    metrics: _VersionMetrics
    window: _Window = field(default_factory=_Window)
    role: Role = "current"

    @property
    def version(self) -> int:
        return self.files.version


@dataclass
class _Router:
    current: LoadedVersion | None = None
    canary: LoadedVersion | None = None
    rejected: dict[int, tuple[tuple[str, int, int], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class InferOutcome:
    """What the protocol layers send back."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    queue_s: float


class ModelManager:
    """Every model of the repository, its versions and their roll-out."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: ServingMetrics,
        *,
        ledger: RolloutLedger | None = None,
    ) -> None:
        """``ledger``: the roll-out decisions shared with the other workers (``--workers``);
        a worker that does not lead applies worker 0's decisions instead of judging."""
        self.settings = settings
        self.metrics = metrics
        self._ledger = ledger
        self._routers: dict[str, _Router] = {}
        self._rng = random.Random()
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ queries
    def models(self) -> dict[str, list[int]]:
        """Model name -> loaded versions (current first)."""
        out = {}
        for name, router in self._routers.items():
            out[name] = [v.version for v in (router.current, router.canary) if v is not None]
        return out

    def ready(self) -> bool:
        return all(r.current is not None for r in self._routers.values())

    def get(self, model: str, version: int | None = None) -> LoadedVersion:
        router = self._routers.get(model)
        if router is None or router.current is None:
            known = ", ".join(sorted(self._routers)) or "none"
            raise ModelNotFoundError(f"model {model!r} is not served (served models: {known})")
        if version is None:
            return router.current
        for loaded in (router.current, router.canary):
            if loaded is not None and loaded.version == version:
                return loaded
        have = ", ".join(str(v) for v in self.models()[model])
        raise ModelNotFoundError(
            f"model {model!r} version {version} is not loaded (loaded: {have})"
        )

    def route(self, model: str, version: int | None) -> LoadedVersion:
        if version is not None:
            return self.get(model, version)
        current = self.get(model)
        router = self._routers[model]
        canary = router.canary
        if canary is not None and self._rng.random() * 100.0 < self.settings.rollout.canary_percent:
            return canary
        return current

    def full(self, model: str, version: int | None, protocol: str) -> bool:
        """Whether a request would find its queue full, checked before its body is parsed.

        Under overload most requests are refused; refusing them before decoding tensors keeps
        the event loop free for the admitted ones. A refusal here is counted like any other.
        """
        router = self._routers.get(model)
        if router is None or router.current is None:
            return False  # the normal path answers 404
        candidates = [router.current, router.canary] if version is None else [
            v for v in (router.current, router.canary) if v is not None and v.version == version
        ]  # fmt: skip
        room = [c for c in candidates if c is not None and c.batcher.admits()]
        if room or not candidates:
            return False
        target = candidates[0]
        assert target is not None
        self.metrics.failures.labels(
            target.spec.name, str(target.version), protocol, "overloaded"
        ).inc()
        return True

    # ------------------------------------------------------------------ inference
    async def infer(
        self, model: str, version: int | None, tensors: dict[str, np.ndarray], protocol: str
    ) -> InferOutcome:
        """Route, check and run one request. Raises the batcher's and this module's errors."""
        started = time.perf_counter()
        loaded = self.route(model, version)
        labels = (loaded.spec.name, str(loaded.version))
        try:
            inputs, rows = check_inputs(loaded.spec, tensors, max_batch=loaded.max_batch)
            result: BatchResult = await loaded.batcher.submit(
                inputs, rows, self.settings.batching.request_timeout_s
            )
        except Exception as err:
            reason = _reason(err)
            self.metrics.failures.labels(*labels, protocol, reason).inc()
            if reason in ("timeout", "model_error"):
                loaded.window.requests += 1
                loaded.window.errors += 1
            raise
        elapsed = time.perf_counter() - started
        loaded.window.requests += 1
        loaded.window.latencies.append(elapsed)
        m = loaded.metrics
        (m.grpc_requests if protocol == "grpc" else m.http_requests).inc()
        m.predictions.inc(rows)
        m.latency.observe(elapsed)
        m.queue.observe(result.queue_s)
        return InferOutcome(loaded.spec.name, loaded.version, result.outputs, result.queue_s)

    # ------------------------------------------------------------------ loading
    async def start(self) -> None:
        """Load the newest version of every model, then start watching the repository."""
        found = await asyncio.to_thread(scan_repository, self.settings.repository)
        if not found:
            logger.warning(
                "model repository %s holds no models yet; watching it", self.settings.repository
            )
        for name, (spec, versions) in found.items():
            router = self._routers.setdefault(name, _Router())
            if not versions:
                logger.warning("model %s has no complete version yet", name)
                continue
            ledger = self._ledger
            newest = ledger.starting_version(name, versions) if ledger else versions[max(versions)]
            loaded = await self._load(spec, newest)
            self._set_role(loaded, "current")
            router.current = loaded
            if ledger is not None and ledger.leader and ledger.outcome(name, newest) is None:
                ledger.record(name, newest, "promoted")
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="watcher")

    async def _load(self, spec: ModelSpec, files: VersionFiles) -> LoadedVersion:
        """Build every instance, warm and validate it; raise RepositoryError if it is unfit."""
        s = self.settings
        instances = spec.instances or s.instances
        max_batch = min(spec.max_batch_size, s.batching.max_batch_size)
        backends: list[Backend] = await asyncio.to_thread(
            lambda: [
                select_backend(files, spec, device=s.device, backend=s.backend, threads=s.threads)
                for _ in range(instances)
            ]
        )
        await asyncio.to_thread(_validate, spec, backends, max_batch)
        labels = (spec.name, str(files.version))
        batch_hist = self.metrics.batch_size.labels(*labels)
        model_hist = self.metrics.model_seconds.labels(*labels)
        sink = None
        if s.drift.trigger_dir is not None or s.drift.webhook is not None:
            sink = _CountingSink(s.drift, self.metrics.triggers.labels(spec.name))
        drift = (
            DriftMonitor(spec.name, files.version, files.reference, s.drift, sink)
            if files.reference and len(spec.inputs) == 1
            else None
        )
        psi_in = self.metrics.drift.labels(*labels, "input")
        psi_out = self.metrics.drift.labels(*labels, "output")
        first_out = spec.outputs[0].name

        def on_batch(
            rows: int, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], sec: float
        ) -> None:
            batch_hist.observe(rows)
            model_hist.observe(sec)
            if drift is not None:
                reading = drift.observe(next(iter(inputs.values())), outputs[first_out])
                if reading is not None:
                    psi_in.set(reading.input_psi)
                    psi_out.set(reading.output_psi)

        delay_us = spec.max_queue_delay_us or s.batching.max_queue_delay_us
        batcher = Batcher(
            [b.run for b in backends],
            max_batch_size=max_batch,
            max_queue_delay_s=delay_us / 1e6,
            # BatchingSettings keeps it 0 or >= max-batch-size >= max_batch
            max_queue_size=s.batching.max_queue_size,
            on_batch=on_batch,
        )
        batcher.start()
        logger.info(
            "loaded %s version %d: %d x %s on %s, max batch %d",
            spec.name, files.version, instances, backends[0].name, backends[0].device, max_batch,
        )  # fmt: skip
        return LoadedVersion(
            spec=spec,
            files=files,
            batcher=batcher,
            backend=backends[0].name,
            device=backends[0].device,
            max_batch=max_batch,
            drift=drift,
            metrics=_VersionMetrics.of(self.metrics, spec.name, files.version),
        )

    def _set_role(self, loaded: LoadedVersion, role: Role | None) -> None:
        name, version = loaded.spec.name, str(loaded.version)
        for r in ("current", "canary"):
            self.metrics.role.labels(name, version, r).set(1.0 if r == role else 0.0)
        if role is not None:
            loaded.role = role

    # ------------------------------------------------------------------ roll-out
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rollout.poll_interval_s)
            try:
                await self.poll()
            except Exception:  # the watcher must outlive any one bad model directory
                logger.exception("watching the model repository failed; retrying")

    async def poll(self) -> None:
        """One pass of the watcher: judge canaries, then look for new versions."""
        for name, router in list(self._routers.items()):
            if router.canary is not None:
                self._judge(name, router)
        try:
            found = await asyncio.to_thread(model_dirs, self.settings.repository)
        except RepositoryError as err:
            logger.warning("cannot scan the model repository: %s", err)
            return
        for model_dir in found:  # each model read once; a bad one is skipped, not fatal
            known = self._routers.get(model_dir.name)
            if known is not None and known.canary is not None:
                continue
            try:
                spec, versions = await asyncio.to_thread(scan_model, model_dir)
            except RepositoryError as err:
                logger.warning("skipping model %s: %s", model_dir.name, err)
                continue
            name = spec.name
            router = self._routers.setdefault(name, _Router())
            newest = max(versions, default=None)
            current = router.current.version if router.current is not None else 0
            if newest is None or newest <= current:
                continue
            files = versions[newest]
            if router.rejected.get(newest) == files.fingerprint:
                continue
            await self._introduce(name, router, spec, files)

    async def _introduce(
        self, name: str, router: _Router, spec: ModelSpec, files: VersionFiles
    ) -> None:
        decided = self._ledger.outcome(name, files) if self._ledger is not None else None
        if decided == "rolled_back":
            router.rejected[files.version] = files.fingerprint
            logger.info("%s version %d was rolled back by worker 0; not loading it",
                        name, files.version)  # fmt: skip
            return
        try:
            loaded = await self._load(spec, files)
        except (PollinateError, OSError) as err:
            router.rejected[files.version] = files.fingerprint
            self.metrics.rollouts.labels(name, "failed_validation").inc()
            logger.error(
                "version %d of %s refused before taking traffic: %s", files.version, name, err
            )
            return
        if router.current is None or decided == "promoted":
            old = router.current
            self._set_role(loaded, "current")
            router.current = loaded
            self.metrics.rollouts.labels(name, "promoted").inc()
            if old is not None:
                self._set_role(old, None)
                self._retire(old)
            elif self._ledger is not None and self._ledger.leader:
                self._ledger.record(name, files, "promoted")
            logger.info("%s version %d is now current (%s)", name, files.version,
                        "promoted by worker 0" if old else "first version")  # fmt: skip
            return
        router.current.window = _Window()
        self._set_role(loaded, "canary")
        router.canary = loaded
        logger.info(
            "%s version %d is the canary for %.1f%% of traffic (current: %d)",
            name, files.version, self.settings.rollout.canary_percent, router.current.version,
        )  # fmt: skip

    def _judge(self, name: str, router: _Router) -> None:
        canary, current = router.canary, router.current
        assert canary is not None and current is not None
        if self._ledger is not None and not self._ledger.leader:
            decided = self._ledger.outcome(name, canary.files)
            if decided is not None:
                self._decide(name, router, decided == "promoted", "as worker 0 decided")
            return
        rules = self.settings.rollout
        if canary.window.requests < rules.min_requests:
            return
        err_c, err_b = canary.window.error_rate(), current.window.error_rate()
        p95_c, p95_b = canary.window.p95(), current.window.p95()
        worse_errors = err_c > err_b + rules.max_error_increase
        # 1 ms of slack keeps sub-millisecond noise from failing a healthy version.
        worse_latency = (
            bool(current.window.latencies) and p95_c > p95_b * rules.max_latency_ratio + 0.001
        )
        promoted = not (worse_errors or worse_latency)
        if self._ledger is not None:
            self._ledger.record(name, canary.files, "promoted" if promoted else "rolled_back")
        why = (
            f"errors {100 * err_c:.2f}% vs {100 * err_b:.2f}%, "
            f"p95 {1e3 * p95_c:.2f} ms vs {1e3 * p95_b:.2f} ms"
        )
        self._decide(name, router, promoted, why)

    def _decide(self, name: str, router: _Router, promoted: bool, why: str) -> None:
        """Promote the canary (the current version drains and unloads) or roll it back."""
        canary, current = router.canary, router.current
        assert canary is not None and current is not None
        router.canary = None
        if not promoted:
            router.rejected[canary.version] = canary.files.fingerprint
            self.metrics.rollouts.labels(name, "rolled_back").inc()
            self._set_role(canary, None)
            logger.warning("%s version %d rolled back: %s", name, canary.version, why)
            self._retire(canary)
            return
        router.current = canary
        self._set_role(canary, "current")
        self._set_role(current, None)
        self.metrics.rollouts.labels(name, "promoted").inc()
        logger.info("%s version %d promoted: %s", name, canary.version, why)
        self._retire(current)

    def _retire(self, loaded: LoadedVersion) -> None:
        loaded.role = "draining"
        task = asyncio.get_running_loop().create_task(loaded.batcher.close(drain=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop watching; finish queued requests of every version, then unload them."""
        if self._watcher is not None:
            self._watcher.cancel()
        for router in self._routers.values():
            for loaded in (router.current, router.canary):
                if loaded is not None:
                    await loaded.batcher.close(drain=True)
        for task in list(self._background):
            await task


class _CountingSink(TriggerSink):
    """The configured trigger sink, counting what it emits in the triggers metric."""

    def __init__(self, settings: DriftSettings, counter: Any) -> None:
        super().__init__(settings.trigger_dir, settings.webhook, settings.webhook_token)
        self._counter = counter

    def emit(self, reading: DriftReading) -> Path | None:
        path = super().emit(reading)
        self._counter.inc()
        return path


def _reason(err: BaseException) -> str:
    from pollinate.serving.batcher import BatcherClosedError, OverloadedError, RequestTimeoutError

    if isinstance(err, OverloadedError):
        return "overloaded"
    if isinstance(err, RequestTimeoutError):
        return "timeout"
    if isinstance(err, InvalidInputError):
        return "invalid"
    if isinstance(err, BatcherClosedError):
        return "unavailable"
    return "model_error"


def _validate(spec: ModelSpec, backends: list[Backend], max_batch: int) -> None:
    """Warm every instance (batch of 1 and a full batch) and check what comes out."""
    for rows in (1, max_batch):
        feed = {t.name: np.zeros((rows, *t.shape[1:]), dtype=t.dtype) for t in spec.inputs}
        for backend in backends:
            try:
                outputs = backend.run(feed)
            except Exception as err:
                raise RepositoryError(f"the model failed on a batch of {rows}: {err}") from err
            for meta in spec.outputs:
                if meta.name not in outputs:
                    raise RepositoryError(f"the model returns no output {meta.name!r}")
                out = outputs[meta.name]
                if tuple(out.shape) != (rows, *meta.shape[1:]) or out.dtype != meta.dtype:
                    raise RepositoryError(
                        f"output {meta.name!r} is {out.dtype} {list(out.shape)}; config.pbtxt "
                        f"says {meta.datatype} {[rows, *meta.shape[1:]]}"
                    )
                if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
                    raise RepositoryError(f"output {meta.name!r} is not finite on zero input")
