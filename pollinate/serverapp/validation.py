"""Reject malformed client updates before they reach aggregation.

A reply is rejected when its arrays do not match the global model (keys, shapes, dtypes),
contain NaN or Inf, move the model further than ``max_update_norm`` (L2 norm of the update,
all tensors together), or its ``num-examples`` is not a positive finite number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

__all__ = ["Rejection", "update_norm", "validate_update"]


@dataclass(frozen=True)
class Rejection:
    """Why one reply was left out of aggregation."""

    client: str
    reason: str


def update_norm(global_arrays: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> float:
    """L2 norm of ``update - global`` over all tensors, computed in float64."""
    total = 0.0
    for key, ref in global_arrays.items():
        diff = update[key].astype(np.float64) - ref.astype(np.float64)
        # einsum, not np.dot: no BLAS call, whose thread pool fights torch's on few cores
        total += float(np.einsum("i,i->", diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def validate_update(
    reply: Message,
    global_arrays: dict[str, np.ndarray],
    *,
    max_update_norm: float,
    weight_key: str = "num-examples",
) -> str | None:
    """Return the reason ``reply`` must be rejected, or ``None`` if it is acceptable.

    ``weight_key``: the metric the strategy weighs by (``num-examples``, or ``client-weight``
    under DP, where no exact count leaves a device)."""
    content = reply.content
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    record: ArrayRecord = next(iter(content.array_records.values()))
    metrics = content.metric_records.get("metrics")
    if metrics is None:
        return "no 'metrics' MetricRecord"
    num_examples = metrics.get(weight_key)
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int | float)
        or not math.isfinite(num_examples)
        or num_examples <= 0
    ):
        return f"{weight_key} must be a positive number, got {num_examples!r}"
    if set(record.keys()) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(global_arrays))
        return f"tensor names differ from the global model (missing {missing}, unexpected {extra})"
    update: dict[str, np.ndarray] = {}
    for key, ref in global_arrays.items():
        try:
            arr = record[key].numpy()
        except Exception as err:
            return f"tensor {key!r} cannot be decoded: {err}"
        if arr.shape != ref.shape:
            return f"tensor {key!r} has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype != ref.dtype:
            return f"tensor {key!r} has dtype {arr.dtype}, expected {ref.dtype}"
        if not np.all(np.isfinite(arr)):
            return f"tensor {key!r} contains NaN or Inf"
        update[key] = arr
    norm = update_norm(global_arrays, update)
    if norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}"
    return None
