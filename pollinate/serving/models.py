"""The model manager: the one object the protocol layers (REST, gRPC) talk to.

:class:`ModelManager` answers the queries (served models, readiness, a version's metadata),
and admits, routes, checks and runs each inference request. Requests are routed when they
arrive and never moved, so a roll-out fails none of them. It composes the parts that do the
work:

* :class:`~pollinate.serving.versions.VersionSet`: the loaded versions of each model, their
  roles, and the look-ups (``versions.py``);
* :class:`~pollinate.serving.loading.VersionLoader`: building, warming and validating a
  version before it takes traffic (``loading.py``);
* :class:`~pollinate.serving.rollout.RolloutPolicy`: the canary split, judgement, promotion
  and rollback, and the repository watcher (``rollout.py``);
* :class:`~pollinate.serving.recorder.MetricsRecorder`: the metrics of requests, versions and
  roll-outs (``recorder.py``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from pollinate.log import logger
from pollinate.serving.batcher import BatchResult, TracedRequest
from pollinate.serving.config import ServeSettings
from pollinate.serving.inputs import check_inputs
from pollinate.serving.ledger import RolloutLedger
from pollinate.serving.loading import VersionLoader
from pollinate.serving.metrics import ServingMetrics
from pollinate.serving.recorder import MetricsRecorder, failure_reason
from pollinate.serving.repository import scan_repository
from pollinate.serving.rollout import RolloutPolicy
from pollinate.serving.versions import LoadedVersion, VersionSet

__all__ = ["InferOutcome", "ModelManager"]


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
        self._recorder = MetricsRecorder(metrics)
        self._versions = VersionSet()
        loader = VersionLoader(settings, self._recorder)
        self._rollout = RolloutPolicy(settings, self._versions, loader, self._recorder, ledger)

    # ------------------------------------------------------------------ queries
    def models(self) -> dict[str, list[int]]:
        """Model name -> loaded versions (current first)."""
        return self._versions.models()

    def ready(self) -> bool:
        return self._versions.ready()

    def get(self, model: str, version: int | None = None) -> LoadedVersion:
        """The current version of ``model``, or its loaded ``version``; else ModelNotFoundError."""
        return self._versions.get(model, version)

    def route(self, model: str, version: int | None) -> LoadedVersion:
        """The version that answers a request (one that names no version may go to a canary)."""
        if version is not None:
            return self._versions.get(model, version)
        current = self._versions.get(model)
        entry = self._versions.lookup(model)
        return self._rollout.split(current, entry.canary if entry is not None else None)

    def full(self, model: str, version: int | None, protocol: str) -> bool:
        """Whether a request would find its queue full, checked before its body is parsed.

        Under overload most requests are refused; refusing them before decoding tensors keeps
        the event loop free for the admitted ones. A refusal here is counted like any other.
        """
        entry = self._versions.lookup(model)
        if entry is None or entry.current is None:
            return False  # the normal path answers 404
        candidates = [entry.current, entry.canary] if version is None else [
            v for v in (entry.current, entry.canary) if v is not None and v.version == version
        ]  # fmt: skip
        room = [c for c in candidates if c is not None and c.batcher.admits()]
        if room or not candidates:
            return False
        target = candidates[0]
        assert target is not None
        self._recorder.failed(target.spec.name, target.version, protocol, "overloaded")
        return True

    # ------------------------------------------------------------------ inference
    async def infer(
        self,
        model: str,
        version: int | None,
        tensors: dict[str, np.ndarray],
        protocol: str,
        trace: TracedRequest | None = None,
    ) -> InferOutcome:
        """Route, check and run one request (``trace``: a sampled request's spans). Raises
        the batcher's, ``inputs.py``'s and ``versions.py``'s errors."""
        started = time.perf_counter()
        loaded = self.route(model, version)
        try:
            inputs, rows = check_inputs(loaded.spec, tensors, max_batch=loaded.max_batch)
            result: BatchResult = await loaded.batcher.submit(
                inputs, rows, self.settings.batching.request_timeout_s, trace
            )
        except Exception as err:
            reason = failure_reason(err)
            self._recorder.failed(loaded.spec.name, loaded.version, protocol, reason)
            if reason in ("timeout", "model_error"):
                loaded.window.failed()
            raise
        elapsed = time.perf_counter() - started
        loaded.window.answered(elapsed)
        loaded.metrics.answered(protocol, rows, elapsed, result.queue_s)
        return InferOutcome(loaded.spec.name, loaded.version, result.outputs, result.queue_s)

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Load the newest version of every model, then start watching the repository."""
        found = await asyncio.to_thread(scan_repository, self.settings.repository)
        if not found:
            logger.warning(
                "model repository %s holds no models yet; watching it", self.settings.repository
            )
        for name, (spec, versions) in found.items():
            await self._rollout.install(name, spec, versions)
        self._rollout.watch()

    async def poll(self) -> None:
        """One pass of the repository watcher: judge canaries, then look for new versions."""
        await self._rollout.poll()

    async def close(self) -> None:
        """Stop watching; finish queued requests of every version, then unload them."""
        self._rollout.stop_watching()
        for loaded in list(self._versions.loaded()):
            await loaded.batcher.close(drain=True)
        await self._rollout.drained()
