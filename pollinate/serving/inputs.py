"""Checking a request's tensors against the model's metadata, before they are queued.

:func:`check_inputs` returns the tensors in model order with the request's batch size, or
raises :class:`InvalidInputError`, which REST answers with 400 and gRPC with
``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import numpy as np

from pollinate.serving.repository import ModelSpec, kserve_datatype

__all__ = ["InvalidInputError", "check_inputs"]


class InvalidInputError(ValueError):
    """A request does not match the model's metadata (HTTP 400 / INVALID_ARGUMENT)."""


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
