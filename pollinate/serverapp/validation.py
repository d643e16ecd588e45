"""Reject malformed client updates before they reach aggregation.

A reply is rejected when its arrays do not match the global model (keys, shapes, dtypes),
contain NaN or Inf, move the model further than ``max_update_norm`` (L2 norm of the update,
all tensors together), or its ``num-examples`` is not a positive finite number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from pollinate.protocol import record_of, records_of

__all__ = ["Reference", "Rejection", "reference_of", "update_norm", "validate_update"]


@dataclass(frozen=True)
class Rejection:
    """Why one reply was left out of aggregation."""

    client: str
    reason: str


@dataclass(frozen=True)
class Reference:
    """The global model as one float64 vector (its tensors flat, in ``keys`` order)."""

    keys: tuple[str, ...]
    flat: np.ndarray


def reference_of(global_arrays: Mapping[str, np.ndarray]) -> Reference:
    """The global model flat in float64: made once a round, shared by every reply's check."""
    keys = tuple(global_arrays)
    flat = np.concatenate([np.asarray(global_arrays[k], dtype=np.float64).ravel() for k in keys])
    return Reference(keys, flat)


def update_norm(
    global_arrays: Mapping[str, np.ndarray],
    update: Mapping[str, np.ndarray],
    *,
    reference: Reference | None = None,
) -> float:
    """L2 norm of ``update - global`` over all tensors, computed in float64 (``reference``:
    :func:`reference_of` the global arrays, if already made). NaN or Inf in ``update``
    gives a non-finite norm."""
    ref = reference if reference is not None else reference_of(global_arrays)
    # one float64 difference over all tensors: three numpy calls, not three per tensor
    diff = np.concatenate([np.asarray(update[key]).ravel() for key in ref.keys], dtype=np.float64)
    diff -= ref.flat
    # einsum, not np.dot: no BLAS call, whose thread pool fights torch's on few cores
    return math.sqrt(float(np.einsum("i,i->", diff, diff)))


def validate_update(
    reply: Message,
    global_arrays: dict[str, np.ndarray],
    *,
    max_update_norm: float,
    weight_key: str = "num-examples",
    reference: Reference | None = None,
) -> str | None:
    """Return the reason ``reply`` must be rejected, or ``None`` if it is acceptable.

    ``weight_key``: the metric the strategy weighs by (``num-examples``, or ``client-weight``
    under DP, where no exact count leaves a device); ``reference``: :func:`reference_of`
    ``global_arrays``, made once for all replies of a round."""
    content = reply.content
    records = records_of(content, ArrayRecord)
    if len(records) != 1:
        return f"expected one ArrayRecord, got {len(records)}"
    record = records[0][1]
    metrics = record_of(content, "metrics", MetricRecord)
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
        update[key] = arr
    norm = update_norm(global_arrays, update, reference=reference)
    if not math.isfinite(norm):  # one pass finds it; name the tensor
        bad = next((k for k, a in update.items() if not np.all(np.isfinite(a))), "?")
        return f"tensor {bad!r} contains NaN or Inf"
    if norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}"
    return None
