"""Parity checks: run an exported artifact against the torch model on real inputs.

Every artifact the export pipeline writes is validated here before it goes into a bundle:
:func:`measure_parity` compares its logits with the torch model's (top-1 agreement, max abs
error) and measures its test accuracy; :func:`check_tolerances` turns a result outside the
tolerances into an :class:`ExportError` that names the artifact, the measured value and the
limit; :func:`latency_ms` times single-sample inference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pollinate.edge_runtime.manifest import predicted_bins
from pollinate.errors import ConfigError, ExportError

__all__ = [
    "PRECISIONS",
    "ExportError",
    "Parity",
    "check_tolerances",
    "latency_ms",
    "measure_parity",
    "task_agreement",
    "task_score",
    "torch_logits",
]

#: Precisions :func:`check_tolerances` knows. ``fp32`` artifacts must reproduce the torch
#: logits; reduced-precision ones (``fp16``, ``int8``) must keep the torch accuracy.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Parity:
    """How closely an artifact reproduces the torch model on a labelled sample set.

    For a regression model "accuracy" is the coefficient of determination R² against the
    targets (1 is perfect; a drop of 0.01 is "one point"), and "agreement" the R² of the
    artifact's predictions against torch's.

    Attributes:
        n: Number of samples compared.
        accuracy: Top-1 accuracy of the artifact against the labels, in ``[0, 1]`` (binary:
            of the decision logit > 0; regression: R²).
        agreement: Share of samples whose artifact top-1 class equals the torch top-1 class.
        max_abs_error: Largest absolute difference between artifact and torch logits
            (``inf`` when the artifact produced a non-finite logit).
        reference_accuracy: Top-1 accuracy of the torch model on the same samples.
    """

    n: int
    accuracy: float
    agreement: float
    max_abs_error: float
    reference_accuracy: float
    task: str = "classification"

    @property
    def accuracy_drop(self) -> float:
        """Accuracy lost against the torch model (negative when the artifact does better)."""
        return self.reference_accuracy - self.accuracy


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def torch_logits(model: torch.nn.Module, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Return the model's logits for ``x`` as a ``float32`` array of shape ``(N, classes)``.

    The model runs in eval mode without gradients, on the device of its parameters, in batches
    of ``batch_size``; its training flag is restored afterwards.

    Raises:
        ConfigError: ``batch_size`` is not a positive integer.
    """
    batch_size = _check_batch_size(batch_size)
    data = np.ascontiguousarray(x, dtype=np.float32)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    outputs: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                # torch.tensor copies: cached datasets are read-only, which from_numpy dislikes
                batch = torch.tensor(data[start : start + batch_size], device=device)
                outputs.append(model(batch).float().cpu().numpy())
    finally:
        model.train(was_training)
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)


def measure_parity(
    run: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    reference_logits: np.ndarray,
    *,
    batch_size: int = 256,
    task: str = "classification",
) -> Parity:
    """Run ``run`` over ``x`` in batches and compare its logits with ``reference_logits``.

    Args:
        run: The artifact's inference function: a ``float32`` batch in, logits out.
        x: Samples, ``(N, ...)``.
        y: Integer labels, ``(N,)``.
        reference_logits: The torch model's logits for ``x``, ``(N, classes)``
            (see :func:`torch_logits`).
        batch_size: Samples per call of ``run``.

    Returns:
        Top-1 accuracy of artifact and reference, their top-1 agreement and the largest
        absolute logit difference.

    Raises:
        ConfigError: The arrays are empty or their lengths differ, or ``batch_size`` is invalid.
        ExportError: The artifact returns logits of another shape than the reference.
    """
    batch_size = _check_batch_size(batch_size)
    data = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.asarray(y)
    reference = np.asarray(reference_logits)
    n = len(data)
    if n == 0:
        raise ConfigError("parity needs at least one sample, got an empty array")
    if labels.shape != (n,) or reference.ndim != 2 or reference.shape[0] != n:
        raise ConfigError(
            f"x, y and reference_logits must describe the same samples: got x {data.shape}, "
            f"y {labels.shape}, reference_logits {reference.shape}"
        )
    chunks: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        batch = data[start : start + batch_size]
        out = np.asarray(run(batch))
        expected = (len(batch), reference.shape[1])
        if out.shape != expected:
            raise ExportError(
                f"artifact returned logits of shape {out.shape} for a batch of {len(batch)}; "
                f"expected {expected}"
            )
        chunks.append(out)
    logits = np.concatenate(chunks)
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    max_abs_error = float(diff.max()) if np.all(np.isfinite(diff)) else math.inf
    return Parity(
        n=n,
        accuracy=task_score(logits, labels, task),
        agreement=task_agreement(logits, reference, task),
        max_abs_error=max_abs_error,
        reference_accuracy=task_score(reference, labels, task),
        task=task,
    )


def task_score(outputs: np.ndarray, y: np.ndarray, task: str) -> float:
    """Accuracy of ``outputs`` against ``y`` (regression: R²)."""
    if task == "regression":
        return _r2(outputs[:, 0], np.asarray(y, dtype=np.float64))
    return float(np.mean(predicted_bins(outputs, task, None) == np.asarray(y).astype(np.int64)))


def task_agreement(outputs: np.ndarray, reference: np.ndarray, task: str) -> float:
    """Share of equal decisions (regression: R² of ``outputs`` against ``reference``)."""
    if task == "regression":
        return _r2(outputs[:, 0], reference[:, 0].astype(np.float64))
    decide = predicted_bins  # the arg-max class, or the binary decision
    return float(np.mean(decide(outputs, task, None) == decide(reference, task, None)))


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    spread = float(np.var(target))
    mse = float(np.mean((pred.astype(np.float64) - target) ** 2))
    if spread <= 0:
        return 1.0 if mse == 0 else -math.inf
    return 1.0 - mse / spread


def check_tolerances(
    name: str,
    parity: Parity,
    *,
    precision: str,
    max_abs_error_fp32: float = 1e-4,
    max_accuracy_drop: float = 0.01,
) -> None:
    """Raise :class:`ExportError` if an artifact is outside the tolerances of its precision.

    * ``fp32``: the largest absolute logit error must be at most ``max_abs_error_fp32``.
    * ``fp16`` and ``int8``: the test accuracy may fall at most ``max_accuracy_drop``
      (a fraction: ``0.01`` is one percentage point) below the torch model's.

    Args:
        name: The artifact, as the message should name it (e.g. a file name).
        parity: Its measured parity (see :func:`measure_parity`).
        precision: ``fp32``, ``fp16`` or ``int8``.
        max_abs_error_fp32: Tolerance of ``fp32`` artifacts.
        max_accuracy_drop: Tolerance of reduced-precision artifacts.

    Raises:
        ConfigError: Unknown precision or a negative / non-finite tolerance.
        ExportError: The artifact is outside its tolerance (a NaN measurement always is).
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
        )
    for option, value in (
        ("max_abs_error_fp32", max_abs_error_fp32),
        ("max_accuracy_drop", max_accuracy_drop),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{option} must be a finite number >= 0, got {value!r}")
    if precision == "fp32":
        # Written as "not <=" so that NaN fails too.
        if not parity.max_abs_error <= max_abs_error_fp32:
            raise ExportError(
                f"{precision} artifact {name!r} does not reproduce the torch model: max abs logit "
                f"error {parity.max_abs_error:.3g} over {parity.n} samples exceeds the tolerance "
                f"{max_abs_error_fp32:.3g} (top-1 agreement {parity.agreement:.2%})"
            )
        return
    drop = parity.accuracy_drop
    if not drop <= max_accuracy_drop:
        score, agree = "accuracy", "top-1 agreement"
        if parity.task == "regression":
            score, agree = "R²", "R² against torch"
        raise ExportError(
            f"{precision} artifact {name!r} loses too much {score}: "
            f"{parity.reference_accuracy:.2%} (torch) -> {parity.accuracy:.2%} over "
            f"{parity.n} samples, a drop of {drop * 100:.2f} points; the tolerance is "
            f"{max_accuracy_drop * 100:.2f} points ({agree} {parity.agreement:.2%}); export "
            f"this format with --precision fp32"
        )


def latency_ms(
    run: Callable[[np.ndarray], np.ndarray],
    sample: np.ndarray,
    *,
    repeats: int = 200,
    warmup: int = 20,
) -> tuple[float, float]:
    """Time ``run(sample)`` and return its median and 95th-percentile latency in milliseconds.

    Args:
        run: The inference function.
        sample: The input passed as is on every call: for single-sample latency, a batch of
            one such as ``x[:1]``.
        repeats: Timed calls.
        warmup: Untimed calls made first (session start-up, caches, lazy allocation).

    Returns:
        ``(p50, p95)`` in milliseconds.

    Raises:
        ConfigError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    data = np.ascontiguousarray(sample, dtype=np.float32)
    for _ in range(warmup):
        run(data)
    times = np.empty(repeats, dtype=np.float64)
    for i in range(repeats):
        start = time.perf_counter_ns()
        run(data)
        times[i] = (time.perf_counter_ns() - start) / 1e6
    p50, p95 = np.percentile(times, [50, 95])
    return float(p50), float(p95)
