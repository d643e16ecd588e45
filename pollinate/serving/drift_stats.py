"""The statistics behind drift detection, free of I/O and threads.

* :func:`psi`: the Population Stability Index of one histogram against another.
* :class:`Reference` and :func:`parse_reference`: the export-time reference of a bundle's
  ``manifest.json`` (a histogram of the per-sample input mean, the share of each predicted
  class), checked once.
* :class:`DriftWindow`: a fixed-size ring buffer of the same two statistics for live samples
  (never the raw inputs), and the PSI of each against the reference.
* :class:`DriftReading`: one such comparison.

:mod:`pollinate.serving.drift` wires these into a monitor per model version;
:mod:`pollinate.serving.retrain_events` writes and reads the events a drifted reading triggers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DriftReading", "DriftWindow", "Reference", "parse_reference", "psi"]


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
class Reference:
    """The export-time statistics a window is compared with."""

    edges: npt.NDArray[np.float64]  # k + 1 increasing bin edges
    counts: npt.NDArray[np.float64]  # k reference counts
    class_share: npt.NDArray[np.float64]  # share per class (or per output bin)
    width: int = 0  # outputs per sample (0: one per class)
    task: str = "classification"
    output_edges: npt.NDArray[np.float64] | None = None  # regression: bins of the value

    @property
    def output_width(self) -> int:
        """Outputs per sample the model must give."""
        return self.width or int(self.class_share.size)


def parse_reference(reference: Mapping[str, Any], task: str = "classification") -> Reference | str:
    """The arrays a monitor needs, or why ``reference`` cannot provide them."""
    if not reference:
        return "empty or missing"
    try:
        edges = np.asarray(reference["input"]["bin_edges"], dtype=np.float64)
        counts = np.asarray(reference["input"]["counts"], dtype=np.float64)
        share = np.asarray(reference["output"]["predicted_class_share"], dtype=np.float64)
        width = int(reference["output"].get("width", 0))
        out_edges = reference["output"].get("bin_edges")
        output_edges = None if out_edges is None else np.asarray(out_edges, dtype=np.float64)
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
    if task == "regression" and (output_edges is None or output_edges.size != share.size + 1):
        return "a regression model's output.bin_edges must have one more value than its shares"
    return Reference(
        edges=edges, counts=counts, class_share=share, width=width, task=task,
        output_edges=output_edges,
    )  # fmt: skip


class DriftWindow:
    """The input mean and predicted class of the last ``size`` live samples (a ring buffer).

    Not thread-safe: the monitor that owns one holds a lock around it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0  # samples appended in total
        self._means = np.zeros(size, dtype=np.float64)
        self._preds = np.zeros(size, dtype=np.int64)
        self._next = 0  # ring position of the next write

    def append(self, means: np.ndarray, preds: np.ndarray) -> None:
        """Add each sample's input mean and predicted class; the oldest ones fall out."""
        window = self.size
        n = len(means)
        self.seen += n
        if n >= window:
            means, preds = means[-window:], preds[-window:]
            n = window
        slots = (self._next + np.arange(n)) % window
        self._means[slots] = means
        self._preds[slots] = preds
        self._next = (self._next + n) % window

    def read(self, ref: Reference) -> tuple[int, float, float]:
        """``(samples, input PSI, output PSI)`` of the window against ``ref``."""
        filled = min(self.seen, self.size)  # the ring fills from slot 0
        means, preds = self._means[:filled], self._preds[:filled]
        # Bin as np.histogram does on the reference edges; values outside go to the end bins.
        bins = np.searchsorted(ref.edges[1:-1], means, side="right")
        counts = np.bincount(bins, minlength=ref.counts.size)
        shares = np.bincount(preds, minlength=ref.class_share.size)
        return filled, psi(ref.counts, counts), psi(ref.class_share, shares)
