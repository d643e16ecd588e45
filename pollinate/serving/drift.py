"""Drift detection for served models: compare live traffic with the export-time reference.

Each exported bundle's ``manifest.json`` carries a ``reference`` made by
``pollinate.edge_runtime.manifest.reference_distribution``: a histogram of the per-sample mean of
the model input (``input.bin_edges``, ``input.counts``) and the share of each predicted class
(``output.predicted_class_share``). A :class:`DriftMonitor` keeps a sliding window of the same
two statistics for live requests (never the raw inputs), computes the Population Stability
Index (:func:`psi`) of each against the reference, and when either exceeds the threshold it asks
a :class:`TriggerSink` to write a retrain event file and, optionally, POST it to a webhook.

This module holds the settings and the monitor that wires the pieces together, and is the
public face of drift detection. The statistics (:func:`psi`, the reference, the window,
:class:`DriftReading`) live in :mod:`pollinate.serving.drift_stats`; the retrain events
(:class:`TriggerSink`, :func:`read_triggers`, :func:`pending_triggers`) in
:mod:`pollinate.serving.retrain_events`. Both are re-exported here.

Example::

    settings = DriftSettings(trigger_dir=Path("triggers"))
    monitor = DriftMonitor.from_reference("mnist", 3, Path("models/mnist/3"), settings)
    reading = monitor.observe(batch, logits)  # a DriftReading every `every` samples, else None
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.edge_runtime.manifest import MANIFEST_NAME, predicted_bins
from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.serving.drift_stats import DriftReading, DriftWindow, Reference, parse_reference, psi
from pollinate.serving.retrain_events import (
    TriggerSink,
    check_webhook,
    pending_triggers,
    read_triggers,
)

__all__ = [
    "DriftMonitor",
    "DriftReading",
    "DriftSettings",
    "TriggerSink",
    "pending_triggers",
    "psi",
    "read_triggers",
]


@dataclass(frozen=True)
class DriftSettings:
    """How a :class:`DriftMonitor` reads drift and what it does about it.

    Attributes:
        threshold: PSI above which a reading counts as drifted (default 0.2).
        window: Samples in the sliding window a reading is computed on (default 1000).
        min_samples: Samples to see before the first reading (default 200, at most ``window``).
        every: New samples between two readings (default 100).
        cooldown_s: Seconds after a trigger during which the same monitor fires no other
            (default 300.0; 0 fires on every drifted reading).
        trigger_dir: Folder for retrain event files (default None: no files).
        webhook: http(s) URL to POST each event to (default None: no POST).
        webhook_token: Bearer token sent with the POST (default None: no Authorization header).

    Raises:
        ConfigError: If a value is out of range, with the accepted range and the default.
    """

    threshold: float = 0.2
    window: int = 1000
    min_samples: int = 200
    every: int = 100
    cooldown_s: float = 300.0
    trigger_dir: Path | None = None
    webhook: str | None = None
    webhook_token: str | None = None

    def __post_init__(self) -> None:
        where = "drift setting"
        if not (_is_number(self.threshold) and 0.0 < self.threshold < math.inf):
            raise ConfigError(
                f"{where} 'threshold' must be a PSI > 0, got {self.threshold!r}; "
                "0.1 is sensitive, 0.2 (the default) flags a significant shift"
            )
        for name, low, default in (("window", 1, 1000), ("every", 1, 100)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(
                    f"{where} {name!r} must be a whole number of samples >= {low}, "
                    f"got {value!r}; the default is {default}"
                )
        if not _is_int(self.min_samples) or not 1 <= self.min_samples <= self.window:
            raise ConfigError(
                f"{where} 'min_samples' must be a whole number in [1, window={self.window}], "
                f"got {self.min_samples!r}; a reading never uses more than 'window' samples"
            )
        if not (_is_number(self.cooldown_s) and 0.0 <= self.cooldown_s < math.inf):
            raise ConfigError(
                f"{where} 'cooldown_s' must be a number of seconds >= 0, got "
                f"{self.cooldown_s!r}; the default is 300 (one trigger per model per 5 minutes)"
            )
        if self.trigger_dir is not None and not isinstance(self.trigger_dir, Path):
            object.__setattr__(self, "trigger_dir", Path(self.trigger_dir))
        check_webhook(self.webhook, self.webhook_token, where)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


class DriftMonitor:
    """Sliding-window drift check of one model version against its export-time reference.

    The window is a fixed-size ring buffer of each sample's input mean and predicted class;
    raw inputs are never kept. ``observe`` is thread-safe and vectorised.

    Args:
        model: Model name (used in readings and event files).
        version: Model version.
        task: The manifest's ``task`` (how outputs become classes for the output PSI).
        reference: The manifest's ``reference`` dict. Without usable
            ``input.bin_edges``, ``input.counts`` and ``output.predicted_class_share`` the
            monitor is disabled: one warning is logged and ``observe`` returns None.
        settings: Threshold, window sizes, cooldown and trigger targets.
        sink: Where triggers go (default: a :class:`TriggerSink` built from ``settings``
            when it names a ``trigger_dir`` or ``webhook``, else none).
        source: Where ``reference`` came from, for the warning (default "reference").
    """

    def __init__(
        self,
        model: str,
        version: int,
        reference: Mapping[str, Any],
        settings: DriftSettings,
        sink: TriggerSink | None = None,
        *,
        source: str = "reference",
        task: str = "classification",
    ) -> None:
        self.model = model
        self.version = version
        self.settings = settings
        if sink is None and (settings.trigger_dir is not None or settings.webhook is not None):
            sink = TriggerSink(settings.trigger_dir, settings.webhook, settings.webhook_token)
        self.sink = sink
        self.last: DriftReading | None = None
        parsed = parse_reference(reference, task)
        self._ref = parsed if isinstance(parsed, Reference) else None
        if isinstance(parsed, str):
            logger.warning(
                "drift monitoring disabled for model %r v%d: %s: %s; it needs input.bin_edges, "
                "input.counts and output.predicted_class_share (re-export the bundle with "
                "`pollinate export` to get them)",
                model, version, source, parsed,
            )  # fmt: skip
        self._lock = threading.Lock()
        self._window = DriftWindow(settings.window)
        self._pending = 0  # samples since the last reading
        self._last_trigger: float | None = None  # time.monotonic() of the last trigger

    @classmethod
    def from_reference(
        cls,
        model: str,
        version: int,
        version_dir: Path,
        settings: DriftSettings,
        sink: TriggerSink | None = None,
    ) -> DriftMonitor:
        """A monitor for the ``reference`` in ``version_dir/manifest.json``.

        A missing or unreadable manifest, or one without a usable reference, gives a disabled
        monitor and one warning; it never raises, so serving goes on without drift checks.

        Args:
            model: Model name.
            version: Model version.
            version_dir: The model version's folder (or the manifest file itself).
            settings: See :class:`DriftSettings`.
            sink: See :class:`DriftMonitor`.
        """
        path = Path(version_dir)
        if path.is_dir():
            path = path / MANIFEST_NAME
        reference: Mapping[str, Any] = {}
        source = str(path)
        task = "classification"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(manifest, dict) and isinstance(manifest.get("reference"), dict):
                reference = manifest["reference"]
                task = str(manifest.get("task", task))
        except (OSError, ValueError) as err:
            cause = err.strerror if isinstance(err, OSError) and err.strerror else err
            source = f"{path} ({cause})"
        return cls(model, version, reference, settings, sink, source=source, task=task)

    @property
    def enabled(self) -> bool:
        """Whether the reference is usable and ``observe`` can produce readings."""
        return self._ref is not None

    @property
    def seen(self) -> int:
        """Samples observed in total."""
        return self._window.seen

    def observe(self, inputs: np.ndarray, outputs: np.ndarray) -> DriftReading | None:
        """Add a batch to the window; every ``settings.every`` samples, read drift.

        Args:
            inputs: Model inputs, first dimension = samples (any float shape).
            outputs: Logits (or scores), samples x classes.

        Returns:
            A :class:`DriftReading` when one is due (at least ``min_samples`` seen and
            ``every`` new samples since the last reading), else None. A drifted reading
            outside the cooldown is passed to the sink; a sink failure is logged, not raised.

        Raises:
            ValueError: If the batch shapes disagree with each other or with the reference.
        """
        ref = self._ref
        if ref is None:
            return None
        x = np.asarray(inputs)
        y = np.asarray(outputs)
        n = len(x) if x.ndim else -1
        if n < 0 or y.ndim != 2 or len(y) != n or y.shape[1] != ref.output_width:
            raise ValueError(
                f"drift monitor {self.model!r} v{self.version}: inputs must be samples x ... "
                f"and outputs samples x {ref.output_width}; got {x.shape} and {y.shape}"
            )
        if n == 0:
            return None
        means = x.reshape(n, -1).mean(axis=1)  # same statistic (and dtype) as the export
        preds = predicted_bins(y, ref.task, ref.output_edges)
        with self._lock:
            self._window.append(means, preds)
            self._pending += n
            due = self._window.seen >= self.settings.min_samples
            if not due or self._pending < self.settings.every:
                return None
            self._pending = 0
            reading = self._read(ref)
            self.last = reading
            fire = reading.drifted and self.sink is not None and self._cooldown_over()
            if fire:
                self._last_trigger = time.monotonic()
        if fire and self.sink is not None:
            try:
                self.sink.emit(reading)
            except OSError as err:
                logger.warning(
                    "drift trigger for model %r v%d could not be written: %s",
                    self.model, self.version, err,
                )  # fmt: skip
        return reading

    def _read(self, ref: Reference) -> DriftReading:
        samples, input_psi, output_psi = self._window.read(ref)
        return DriftReading(
            model=self.model,
            version=self.version,
            samples=samples,
            input_psi=input_psi,
            output_psi=output_psi,
            threshold=self.settings.threshold,
            drifted=max(input_psi, output_psi) > self.settings.threshold,
        )

    def _cooldown_over(self) -> bool:
        if self._last_trigger is None:
            return True
        return time.monotonic() - self._last_trigger >= self.settings.cooldown_s
