"""Loading a model version: its instances, warm-up and validation, batcher and drift monitor.

:class:`VersionLoader` turns a version's files into a :class:`LoadedVersion` ready for
traffic. It builds every instance (one backend each, ``backends.py``), warms each with a batch
of one and a full batch and checks what comes out (output names, shapes, dtypes, finite
values), then starts the version's :class:`Batcher`, whose per-batch hook records the batch
metrics and feeds the drift monitor. A version that fails a check raises
:class:`RepositoryError` before it takes any traffic.
"""

from __future__ import annotations

import asyncio

import numpy as np

from pollinate.errors import RepositoryError
from pollinate.log import logger
from pollinate.serving.backends import Backend, select_backend
from pollinate.serving.batcher import Batcher
from pollinate.serving.config import ServeSettings
from pollinate.serving.drift import DriftMonitor
from pollinate.serving.recorder import MetricsRecorder
from pollinate.serving.repository import ModelSpec, VersionFiles
from pollinate.serving.versions import LoadedVersion

__all__ = ["VersionLoader"]


class VersionLoader:
    """Builds, warms and validates model versions as ``settings`` and each model's config say."""

    def __init__(self, settings: ServeSettings, recorder: MetricsRecorder) -> None:
        self.settings = settings
        self._recorder = recorder

    async def load(self, spec: ModelSpec, files: VersionFiles) -> LoadedVersion:
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
        metrics = self._recorder.version(spec.name, files.version)
        sink = self._recorder.trigger_sink(s.drift, spec.name)
        drift = (
            DriftMonitor(spec.name, files.version, files.reference, s.drift, sink)
            if files.reference and len(spec.inputs) == 1
            else None
        )
        first_out = spec.outputs[0].name

        def on_batch(
            rows: int, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], sec: float
        ) -> None:
            metrics.batch(rows, sec)
            if drift is not None:
                reading = drift.observe(next(iter(inputs.values())), outputs[first_out])
                if reading is not None:
                    metrics.drift(reading)

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
            metrics=metrics,
        )


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
