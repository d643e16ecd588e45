"""Drift detection for served models: compare live traffic with the export-time reference.

Each exported bundle's ``manifest.json`` carries a ``reference`` made by
``pollinate.edge_runtime.manifest.reference_distribution``: a histogram of the per-sample mean of
the model input (``input.bin_edges``, ``input.counts``) and the share of each predicted class
(``output.predicted_class_share``). A :class:`DriftMonitor` keeps a sliding window of the same
two statistics for live requests (never the raw inputs), computes the Population Stability
Index (:func:`psi`) of each against the reference, and when either exceeds the threshold it asks
a :class:`TriggerSink` to write a retrain event file and, optionally, POST it to a webhook.

Example::

    settings = DriftSettings(trigger_dir=Path("triggers"))
    monitor = DriftMonitor.from_reference("mnist", 3, Path("models/mnist/3"), settings)
    reading = monitor.observe(batch, logits)  # a DriftReading every `every` samples, else None
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pollinate._atomic import atomic_write_text
from pollinate.edge_runtime.manifest import MANIFEST_NAME
from pollinate.errors import ConfigError
from pollinate.log import logger

__all__ = [
    "DriftMonitor",
    "DriftReading",
    "DriftSettings",
    "TriggerSink",
    "pending_triggers",
    "psi",
    "read_triggers",
]

EVENT = "pollinate.retrain"
WEBHOOK_TIMEOUT_S = 5.0
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, *, eps: float = 1e-4) -> float:
    """Population Stability Index of ``actual`` against ``expected``.

    Args:
        expected: Reference histogram, as counts or shares (one value per bin).
        actual: Observed histogram over the same bins, as counts or shares.
        eps: Floor applied to every share after normalisation, so empty bins stay finite
            (default 1e-4).

    Returns:
        ``sum((a - e) * ln(a / e))`` over the bins, with ``e`` and ``a`` the floored shares;
        0.0 for identical distributions. Below 0.1 is usually read as stable, above 0.2 as
        a significant shift.

    Raises:
        ValueError: If the histograms are empty, differ in length, hold negative or
            non-finite values, sum to zero, or ``eps`` is not positive.
    """
    e = np.asarray(expected, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    if not eps > 0.0:
        raise ValueError(f"psi: eps must be > 0, got {eps}")
    if e.size == 0 or a.size == 0:
        raise ValueError("psi: both histograms need at least one bin, got an empty one")
    if e.size != a.size:
        raise ValueError(
            f"psi: the histograms have {e.size} and {a.size} bins; they must share the same bins"
        )
    for name, values in (("expected", e), ("actual", a)):
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(f"psi: {name} must hold finite counts or shares >= 0")
        if values.sum() <= 0:
            raise ValueError(f"psi: {name} sums to zero; there is no distribution to compare")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def _check_webhook(webhook: str | None, token: str | None, where: str) -> None:
    """Raise ConfigError unless ``webhook`` is an http(s) URL and ``token`` a one-line value."""
    if webhook is not None and not re.match(r"^https?://[^\s/]+", webhook):
        raise ConfigError(
            f"{where} 'webhook' must be an http:// or https:// URL, got {webhook!r}; "
            "e.g. https://ci.example.com/hooks/retrain"
        )
    if token is not None:
        if webhook is None:
            raise ConfigError(f"{where} 'webhook_token' is set but 'webhook' is not; set both")
        if not token or any(c in token for c in "\r\n"):
            raise ConfigError(
                f"{where} 'webhook_token' must be a non-empty single-line bearer token"
            )


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
        _check_webhook(self.webhook, self.webhook_token, where)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


@dataclass(frozen=True)
class DriftReading:
    """One comparison of a monitor's window with the reference.

    Attributes:
        model: Model name.
        version: Model version.
        samples: Samples in the window the reading was computed on.
        input_psi: PSI of the per-sample input mean histogram.
        output_psi: PSI of the predicted-class shares.
        threshold: The PSI threshold in force.
        drifted: Whether ``max(input_psi, output_psi) > threshold``.
    """

    model: str
    version: int
    samples: int
    input_psi: float
    output_psi: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class _Reference:
    edges: npt.NDArray[np.float64]  # k + 1 increasing bin edges
    counts: npt.NDArray[np.float64]  # k reference counts
    class_share: npt.NDArray[np.float64]  # share per class


def _parse_reference(reference: Mapping[str, Any]) -> _Reference | str:
    """The arrays a monitor needs, or why ``reference`` cannot provide them."""
    if not reference:
        return "empty or missing"
    try:
        edges = np.asarray(reference["input"]["bin_edges"], dtype=np.float64)
        counts = np.asarray(reference["input"]["counts"], dtype=np.float64)
        share = np.asarray(reference["output"]["predicted_class_share"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        return f"incomplete ({what})"
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        return "input.bin_edges must be at least 2 increasing numbers"
    if counts.shape != (edges.size - 1,):
        return f"input.counts must have {edges.size - 1} values (one per bin)"
    for name, values in (("input.counts", counts), ("output.predicted_class_share", share)):
        if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
            return f"{name} must be a non-empty list of numbers"
        if np.any(values < 0) or values.sum() <= 0:
            return f"{name} must be >= 0 with a positive sum"
    return _Reference(edges=edges, counts=counts, class_share=share)


class TriggerSink:
    """Where retrain events go: one JSON file per trigger, and optionally a webhook POST.

    Args:
        trigger_dir: Folder for event files, created on first use (None: no files).
        webhook: http(s) URL to POST each event to (None: no POST).
        webhook_token: Bearer token for the POST's Authorization header (None: none).

    Raises:
        ConfigError: If ``webhook`` is not an http(s) URL or the token is unusable.
    """

    def __init__(
        self, trigger_dir: Path | None, webhook: str | None, webhook_token: str | None = None
    ) -> None:
        _check_webhook(webhook, webhook_token, "trigger sink")
        self.trigger_dir = Path(trigger_dir) if trigger_dir is not None else None
        self.webhook = webhook
        self._token = webhook_token
        self._posts: list[threading.Thread] = []
        self._lock = threading.Lock()

    def emit(self, reading: DriftReading) -> Path | None:
        """Record a retrain event for ``reading``.

        The file ``retrain-<model>-v<version>-<YYYYmmddTHHMMSSZ>-<8 hex>.json`` is written
        atomically (temporary file in the same folder, fsync, rename). The webhook POST runs in
        a daemon thread (timeout 5 s); its failures are logged as warnings, never raised.

        Returns:
            The event file's path, or None without a ``trigger_dir``.

        Raises:
            OSError: If the event file cannot be written.
        """
        now = dt.datetime.now(dt.UTC)
        event = {
            "event": EVENT,
            "reason": "drift",
            "model": reading.model,
            "version": reading.version,
            "psi": {"input": reading.input_psi, "output": reading.output_psi},
            "threshold": reading.threshold,
            "samples": reading.samples,
            "time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        body = json.dumps(event, indent=2) + "\n"
        path = None
        if self.trigger_dir is not None:
            model = _SAFE_NAME.sub("_", reading.model) or "_"
            stamp = now.strftime("%Y%m%dT%H%M%SZ")
            name = f"retrain-{model}-v{reading.version}-{stamp}-{uuid.uuid4().hex[:8]}.json"
            path = self.trigger_dir / name
            atomic_write_text(path, body)
        if self.webhook is not None:
            post = threading.Thread(
                target=self._post, args=(body.encode("utf-8"),), name="pollinate-drift-webhook"
            )
            post.daemon = True
            with self._lock:
                self._posts = [t for t in self._posts if t.is_alive()]
                self._posts.append(post)
            post.start()
        return path

    def join(self, timeout: float | None = None) -> None:
        """Wait for pending webhook POSTs, at most ``timeout`` seconds each (None: no limit)."""
        with self._lock:
            posts = list(self._posts)
        for post in posts:
            post.join(timeout)

    def _post(self, body: bytes) -> None:
        assert self.webhook is not None
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.webhook, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S):
                pass
        except urllib.error.HTTPError as err:
            err.close()
            logger.warning("drift webhook %s answered HTTP %d %s", self.webhook, err.code, err.msg)
        except Exception as err:  # a webhook must never take the serving tier down
            logger.warning("drift webhook %s failed: %s", self.webhook, err)


def read_triggers(trigger_dir: Path) -> list[dict[str, Any]]:
    """The retrain events in ``trigger_dir``, oldest first.

    Temporary files of writes in progress and files that are not valid event JSON are
    skipped (the latter with a warning). A missing folder holds no events.

    Args:
        trigger_dir: The folder a :class:`TriggerSink` writes to.

    Returns:
        The event dicts, sorted by their ``time`` field (then file name).
    """
    return [event for _path, event in pending_triggers(trigger_dir)]


def pending_triggers(trigger_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Like :func:`read_triggers`, with each event's file: ``(path, event)``, oldest first."""
    folder = Path(trigger_dir)
    if not folder.is_dir():
        return []
    found: list[tuple[str, str, Path, dict[str, Any]]] = []
    for path in folder.glob("retrain-*.json"):
        try:
            event = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:  # taken by a consumer since the listing
            continue
        except (OSError, ValueError) as err:
            logger.warning("skipping unreadable retrain event %s: %s", path, err)
            continue
        if not isinstance(event, dict) or event.get("event") != EVENT:
            logger.warning("skipping %s: not a %s event", path, EVENT)
            continue
        found.append((str(event.get("time", "")), path.name, path, event))
    found.sort(key=lambda f: (f[0], f[1]))
    return [(path, event) for _time, _name, path, event in found]


class DriftMonitor:
    """Sliding-window drift check of one model version against its export-time reference.

    The window is a fixed-size ring buffer of each sample's input mean and predicted class;
    raw inputs are never kept. ``observe`` is thread-safe and vectorised.

    Args:
        model: Model name (used in readings and event files).
        version: Model version.
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
    ) -> None:
        self.model = model
        self.version = version
        self.settings = settings
        if sink is None and (settings.trigger_dir is not None or settings.webhook is not None):
            sink = TriggerSink(settings.trigger_dir, settings.webhook, settings.webhook_token)
        self.sink = sink
        self.last: DriftReading | None = None
        parsed = _parse_reference(reference)
        self._ref = parsed if isinstance(parsed, _Reference) else None
        if isinstance(parsed, str):
            logger.warning(
                "drift monitoring disabled for model %r v%d: %s: %s; it needs input.bin_edges, "
                "input.counts and output.predicted_class_share (re-export the bundle with "
                "`pollinate export` to get them)",
                model, version, source, parsed,
            )  # fmt: skip
        self._lock = threading.Lock()
        self._means = np.zeros(settings.window, dtype=np.float64)
        self._preds = np.zeros(settings.window, dtype=np.int64)
        self._next = 0  # ring position of the next write
        self._seen = 0  # samples observed in total
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
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(manifest, dict) and isinstance(manifest.get("reference"), dict):
                reference = manifest["reference"]
        except (OSError, ValueError) as err:
            cause = err.strerror if isinstance(err, OSError) and err.strerror else err
            source = f"{path} ({cause})"
        return cls(model, version, reference, settings, sink, source=source)

    @property
    def enabled(self) -> bool:
        """Whether the reference is usable and ``observe`` can produce readings."""
        return self._ref is not None

    @property
    def seen(self) -> int:
        """Samples observed in total."""
        return self._seen

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
        if n < 0 or y.ndim != 2 or len(y) != n or y.shape[1] != ref.class_share.size:
            raise ValueError(
                f"drift monitor {self.model!r} v{self.version}: inputs must be samples x ... "
                f"and outputs samples x {ref.class_share.size} (classes); got {x.shape} "
                f"and {y.shape}"
            )
        if n == 0:
            return None
        means = x.reshape(n, -1).mean(axis=1)  # same statistic (and dtype) as the export
        preds = y.argmax(axis=1)
        with self._lock:
            self._append(means, preds)
            if self._seen < self.settings.min_samples or self._pending < self.settings.every:
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

    def _append(self, means: np.ndarray, preds: np.ndarray) -> None:
        window = self.settings.window
        n = len(means)
        self._seen += n
        self._pending += n
        if n >= window:
            means, preds = means[-window:], preds[-window:]
            n = window
        slots = (self._next + np.arange(n)) % window
        self._means[slots] = means
        self._preds[slots] = preds
        self._next = (self._next + n) % window

    def _read(self, ref: _Reference) -> DriftReading:
        filled = min(self._seen, self.settings.window)  # the ring fills from slot 0
        means, preds = self._means[:filled], self._preds[:filled]
        # Bin as np.histogram does on the reference edges; values outside go to the end bins.
        bins = np.searchsorted(ref.edges[1:-1], means, side="right")
        counts = np.bincount(bins, minlength=ref.counts.size)
        shares = np.bincount(preds, minlength=ref.class_share.size)
        input_psi = psi(ref.counts, counts)
        output_psi = psi(ref.class_share, shares)
        return DriftReading(
            model=self.model,
            version=self.version,
            samples=filled,
            input_psi=input_psi,
            output_psi=output_psi,
            threshold=self.settings.threshold,
            drifted=max(input_psi, output_psi) > self.settings.threshold,
        )

    def _cooldown_over(self) -> bool:
        if self._last_trigger is None:
            return True
        return time.monotonic() - self._last_trigger >= self.settings.cooldown_s
