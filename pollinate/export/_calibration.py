"""Calibration samples for static quantization: drawing them from a run's data, checking them.

The INT8 quantizers (ONNX Runtime, NNCF, the LiteRT converter) all calibrate on real
training samples; :func:`calibration_samples` draws them reproducibly from the training
split (never the test split artifacts are judged on), :func:`check_calibration` rejects
empty, non-numeric or non-finite batches with a :class:`~pollinate.errors.ConfigError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pollinate.errors import ConfigError

if TYPE_CHECKING:  # pollinate.data is not imported at run time: the TFLite path needs none
    from pollinate.data import DatasetSplit

__all__ = ["calibration_samples", "check_calibration"]


def calibration_samples(data: DatasetSplit, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` training samples drawn with ``seed``, in dataset order, as ``float32``."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.train), size=min(n, len(data.train)), replace=False)
    return np.ascontiguousarray(data.train.x[np.sort(idx)], dtype=np.float32)


def check_calibration(calibration: np.ndarray) -> np.ndarray:
    """A non-empty, finite float32 batch of samples, or a ConfigError saying what is wrong."""
    data = np.asarray(calibration)
    if data.ndim < 2 or len(data) == 0:
        raise ConfigError(
            f"calibration must be a non-empty batch of samples (N, ...), got shape {data.shape}"
        )
    if not np.issubdtype(data.dtype, np.number):
        raise ConfigError(f"calibration must hold numbers, got dtype {data.dtype}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise ConfigError("calibration samples contain NaN or infinite values")
    return data
