"""A user's data loader by import path: ``dataset = "mypackage.data:load"``.

Either the loader takes no arguments and returns the whole labelled dataset, which pollinate
then splits, partitions and checks exactly like a built-in one; or it takes
``(partition_id, num_partitions)``, as Flower's ``load_data`` does, and returns one client's
share: each share is split into train and test on its own (seeded by the run seed and the
partition), the client trains on its train part, and the server evaluates on every share's
test part. It may return:

* a pair ``(x, y)`` of arrays (numpy, torch tensors or nested lists), one sample per row;
* a mapping with keys ``"x"`` and ``"y"``;
* a map-style torch ``Dataset`` whose items are ``(x, y)`` pairs;
* (a per-partition loader) a pair of such Datasets or DataLoaders, ``(train, test)`` as
  Flower's template returns them: taken together as the share, which pollinate splits itself.

Samples keep the shape the loader gives them (the model sees them as they are) and become
float32; the targets are numbers (what they mean is the task's: :mod:`pollinate.tasks`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pollinate._imports import import_object
from pollinate.data._local import RawData, _check_samples, _labels_from_array, _numbered_labels
from pollinate.errors import ConfigError, DataError, PollinateError

__all__ = ["PARTITION_ARGUMENTS", "is_partition_loader", "read_loader", "read_partition"]

_RETURNS = "return (x, y) arrays, a mapping with 'x' and 'y', or a torch Dataset of (x, y) pairs"


#: the arguments of a per-partition loader (Flower's ``load_data(partition_id, num_partitions)``)
PARTITION_ARGUMENTS = ("partition_id", "num_partitions")


def _loader(spec: str) -> tuple[Callable[..., Any], list[str]]:
    """The loader ``spec`` names and its required parameters."""
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
    return loader, required


def is_partition_loader(spec: str) -> bool:
    """Whether ``spec`` names a loader of one partition, ``load(partition_id, num_partitions)``
    (rather than of the whole dataset, ``load()``)."""
    _, required = _loader(spec)
    return required == list(PARTITION_ARGUMENTS)


def read_loader(spec: str) -> RawData:
    """Call the loader ``spec`` names and check what it returns."""
    loader, required = _loader(spec)
    if required:
        raise ConfigError(
            f"data {spec!r} takes {', '.join(map(repr, required))}; a data loader takes no "
            f"arguments and returns the whole dataset ({_RETURNS}), or takes (partition_id, "
            "num_partitions) and returns that client's share"
        )
    return _checked(_call(loader, spec), spec)


def read_partition(spec: str, partition_id: int, num_partitions: int) -> RawData:
    """The samples ``load(partition_id, num_partitions)`` returns for one client, checked."""
    loader, _ = _loader(spec)
    where = f"{spec}({partition_id}, {num_partitions})"
    return _checked(_call(loader, where, partition_id, num_partitions), where)


def _call(loader: Callable[..., Any], spec: str, *args: int) -> Any:
    try:
        return loader(*args)
    except PollinateError:
        raise
    except Exception as err:
        raise DataError(f"data {spec!r}: the loader failed: {type(err).__name__}: {err}") from None


def _checked(result: Any, spec: str) -> RawData:
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
    elif isinstance(result, tuple | list) and len(result) == 2 and all(map(_is_dataset, result)):
        # Flower's template returns (trainloader, testloader): one partition, split again here
        first, second = (_from_dataset(getattr(d, "dataset", d), spec) for d in result)
        pair = (np.concatenate([first[0], second[0]]), np.concatenate([first[1], second[1]]))
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


def _is_dataset(value: Any) -> bool:
    """A torch Dataset or DataLoader (not an array or a tensor)."""
    if hasattr(value, "dataset") and hasattr(value, "batch_size"):  # a DataLoader
        return True
    array_like = hasattr(value, "shape") or isinstance(value, list | tuple)
    return not array_like and hasattr(value, "__getitem__") and hasattr(value, "__len__")


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
