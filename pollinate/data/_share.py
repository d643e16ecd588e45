"""One client's share of a data set: :func:`load_partition`.

The rules that divide a data set are :mod:`pollinate.data._partition`'s. Here a client gets
its own share: ``"resample"`` and ``"iid"`` shares are made for that client alone (a draw
seeded by the client's partition, or a slice of one seeded permutation), so a population of
a million costs what its sampled clients cost; the other partitioners divide the data once per
process (cached) and hand out one part.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from pollinate._imports import is_import_path
from pollinate.data._datasets import (
    check_seed,
    check_test_fraction,
    load_dataset,
    partition_split,
)
from pollinate.data._partition import (
    Partitioner,
    _as_int,
    _as_partitioner,
    _check_iid_count,
    _check_options,
    _iid_order,
    _iid_slice,
    _resample_one,
    _resample_size,
    partition_indices,
)
from pollinate.data._plugin import is_partition_loader, read_partition
from pollinate.data._types import ArrayDataset
from pollinate.errors import ConfigError
from pollinate.tasks import TaskKind, detect_task, task_targets

__all__ = ["load_partition"]


def load_partition(
    source: str | os.PathLike[str],
    partition_id: int,
    num_partitions: int,
    partitioner: Partitioner | str,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    samples_per_partition: int = 0,
    test_fraction: float = 0.2,
    task: TaskKind | str = TaskKind.AUTO,
) -> ArrayDataset:
    """Return one client's share of the training part of ``source``.

    Equivalent to ``load_dataset(source, test_fraction=test_fraction, seed=seed).train.subset(
    partition_indices(train.y, num_partitions, partitioner, ...)[partition_id])``, with the
    partition list cached per process so that calling it for every client is cheap. A loader
    of one share at a time (``load(partition_id, num_partitions)``) is called for this client
    only, and the share's train part is returned (``partitioner`` and its options are not
    used: the loader partitions).

    Raises:
        ConfigError: An argument is out of range (including ``partition_id``).
        DataError: The source cannot be read.
    """
    mode = _as_partitioner(partitioner)
    partition_id = _as_int(partition_id, "partition_id")
    num_partitions = _as_int(num_partitions, "num_partitions")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition_id must be between 0 and {num_partitions - 1}, got {partition_id}."
        )
    fraction = check_test_fraction(test_fraction)
    seed = check_seed(seed)
    name = os.fspath(source)
    if is_import_path(name) and is_partition_loader(name):
        return _own_share(name, partition_id, num_partitions, fraction, seed, TaskKind(task))
    alpha_value, shards = _check_options(alpha, shards_per_partition)
    # Settings a mode ignores are normalised so that they do not split the cache.
    if mode is not Partitioner.DIRICHLET:
        alpha_value = 0.5
    if mode is not Partitioner.SHARDS:
        shards = 2
    samples = _as_int(samples_per_partition, "samples_per_partition")
    if mode is not Partitioner.RESAMPLE:
        samples = 0
    kind = TaskKind(task)
    train = load_dataset(source, test_fraction=fraction, seed=seed, task=kind).train
    n = len(train)
    if mode is Partitioner.RESAMPLE:  # each partition on its own: nothing built for the others
        size = _resample_size(n, num_partitions, samples)
        return train.subset(_resample_one(n, seed, partition_id, size))
    if mode is Partitioner.IID:
        _check_iid_count(n, num_partitions)
        return train.subset(_iid_order(n, seed)[_iid_slice(n, num_partitions, partition_id)])
    partitions = _partitions_cached(
        os.fspath(source), num_partitions, mode, seed, alpha_value, shards, samples, fraction, kind
    )
    return train.subset(partitions[partition_id])


@functools.lru_cache(maxsize=64)
def _own_share(
    source: str, partition_id: int, num_partitions: int, fraction: float, seed: int, task: TaskKind
) -> ArrayDataset:
    """One client's train part from a per-partition loader: only its own share is loaded,
    split exactly as the server splits it (:func:`partition_split`)."""
    raw = read_partition(source, partition_id, num_partitions)
    kind = detect_task(task, raw.y, source)  # as given, or read from the share for auto
    y = task_targets(kind, raw.y, source)
    train = partition_split(len(y), fraction, seed, partition_id)
    return ArrayDataset(x=raw.x[train], y=y[train])


@functools.lru_cache(maxsize=16)
def _partitions_cached(
    source: str,
    num_partitions: int,
    mode: Partitioner,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    samples_per_partition: int,
    test_fraction: float,
    task: TaskKind,
) -> tuple[np.ndarray, ...]:
    train = load_dataset(source, test_fraction=test_fraction, seed=seed, task=task).train
    return tuple(
        partition_indices(
            train.y,
            num_partitions,
            mode,
            seed=seed,
            alpha=alpha,
            shards_per_partition=shards_per_partition,
            samples_per_partition=samples_per_partition,
        )
    )
