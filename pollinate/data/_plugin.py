"""A user's data loader by import path: ``dataset = "mypackage.data:load"``.

The loader takes no arguments and returns the whole labelled dataset, which pollinate then
splits, partitions and checks exactly like a built-in one. It may return:

* a pair ``(x, y)`` of arrays (numpy, torch tensors or nested lists), one sample per row;
* a mapping with keys ``"x"`` and ``"y"``;
* a map-style torch ``Dataset`` whose items are ``(x, y)`` pairs.

Samples keep the shape the loader gives them (the model sees them as they are) and become
float32; labels must be class numbers 0..K-1.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pollinate._imports import import_object
from pollinate.data._local import RawData, _check_samples, _labels_from_array, _numbered_labels
from pollinate.errors import ConfigError, DataError, PollinateError

__all__ = ["read_loader"]

_RETURNS = "return (x, y) arrays, a mapping with 'x' and 'y', or a torch Dataset of (x, y) pairs"


def read_loader(spec: str) -> RawData:
    """Call the loader ``spec`` names and check what it returns."""
    loader = import_object(spec, "data")
    if not callable(loader):
        raise ConfigError(f"data {spec!r} is a {type(loader).__name__}, not a loader function")
    try:
        required = [
            name
            for name, p in inspect.signature(loader).parameters.items()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except (TypeError, ValueError):
        required = []
    if required:
        raise ConfigError(
            f"data {spec!r} takes {', '.join(map(repr, required))}; a data loader takes no "
            f"arguments and returns the whole dataset ({_RETURNS}): pollinate partitions it"
        )
    try:
        result = loader()
    except PollinateError:
        raise
    except Exception as err:
        raise DataError(f"data {spec!r}: the loader failed: {type(err).__name__}: {err}") from None
    x, y = _arrays(result, spec)
    if x.ndim < 2:
        raise DataError(
            f"data {spec!r}: samples have shape {x.shape}; expected (N, ...) with one sample "
            "per row"
        )
    if x.dtype.kind not in "fiub":
        raise DataError(f"data {spec!r}: samples have dtype {x.dtype}; expected numbers")
    x = x.astype(np.float32)
    y = _labels_from_array(y, f"data {spec!r}")
    x, y = _check_samples(x, y, f"data {spec!r}")
    return RawData(x=x, y=y, labels=_numbered_labels(y))


def _arrays(result: Any, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as numpy arrays from whatever form the loader returned."""
    if isinstance(result, Mapping):
        if "x" not in result or "y" not in result:
            raise DataError(f"data {spec!r} returned a mapping without 'x' and 'y'; {_RETURNS}")
        pair: Sequence[Any] = (result["x"], result["y"])
    elif isinstance(result, tuple | list) and len(result) == 2:
        pair = result
    elif hasattr(result, "__getitem__") and hasattr(result, "__len__"):
        pair = _from_dataset(result, spec)
    else:
        raise DataError(f"data {spec!r} returned a {type(result).__name__}; {_RETURNS}")
    try:
        return _numpy(pair[0]), _numpy(pair[1])
    except (TypeError, ValueError) as err:
        raise DataError(f"data {spec!r}: cannot read its arrays ({err}); {_RETURNS}") from None


def _from_dataset(dataset: Any, spec: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(
                f"data {spec!r}: item {i} of its Dataset is a {type(item).__name__}, not an "
                "(x, y) pair"
            )
        xs.append(_numpy(item[0]))
        ys.append(_numpy(item[1]))
    if not xs:
        raise DataError(f"data {spec!r} returned an empty Dataset")
    return np.stack(xs), np.asarray(ys).reshape(len(ys), -1).squeeze(1)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)
