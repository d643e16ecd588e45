"""Splitting a training set among simulated clients with flwr-datasets partitioners."""

from __future__ import annotations

import functools
import operator
import os
import warnings
from enum import StrEnum
from typing import Any

import numpy as np

from pollinate._imports import is_import_path
from pollinate.data._datasets import (
    check_seed,
    check_test_fraction,
    load_dataset,
    partition_split,
)
from pollinate.data._plugin import is_partition_loader, read_partition
from pollinate.data._types import ArrayDataset
from pollinate.errors import ConfigError, DataError
from pollinate.log import logger
from pollinate.tasks import TaskKind, detect_task, task_targets


class Partitioner(StrEnum):
    """How the training set is divided among clients; values are the CLI strings."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"
    RESAMPLE = "resample"


def _as_partitioner(partitioner: Partitioner | str) -> Partitioner:
    if isinstance(partitioner, Partitioner):
        return partitioner
    try:
        return Partitioner(str(partitioner).strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in Partitioner)
        raise ConfigError(
            f"Unknown partitioner {partitioner!r}; choose one of: {choices}."
        ) from None


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}.") from None


def _check_options(alpha: float, shards_per_partition: int) -> tuple[float, int]:
    """Validate the Dirichlet ``alpha`` and the shards per partition."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.integer | np.floating)
        or not (np.isfinite(alpha) and alpha > 0)
    ):
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}.")
    shards = _as_int(shards_per_partition, "shards_per_partition")
    if shards < 1:
        raise ConfigError(f"shards_per_partition must be at least 1, got {shards}.")
    return float(alpha), shards


def _check_labels(labels: np.ndarray, mode: Partitioner) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"Labels to partition must be a non-empty 1-D array, got shape {y.shape}.")
    if mode in (Partitioner.IID, Partitioner.RESAMPLE):
        return y  # only the number of samples counts
    whole = y.dtype.kind in "iu" or (y.dtype.kind == "f" and bool(np.all(y == np.round(y))))
    if not whole:
        raise DataError(
            f"the {mode.value!r} partitioner splits by class label, and these targets are "
            f"not class labels (dtype {y.dtype}, e.g. a regression target); use the 'iid' or "
            "'resample' partitioner"
        )
    return y.astype(np.int64)


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: Partitioner | str,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    samples_per_partition: int = 0,
) -> list[np.ndarray]:
    """Divide the samples with ``labels`` into ``num_partitions`` partitions.

    The work is done by flwr-datasets' ``IidPartitioner`` (on a copy shuffled with ``seed``),
    ``DirichletPartitioner`` (``self_balancing=True``, no minimum size) or ``ShardPartitioner``.
    IID partitions are computed with numpy exactly as flwr-datasets computes them (a test
    holds the two equal): milliseconds instead of seconds for thousands of partitions.
    ``"resample"`` is for populations larger than the data: each partition is its own seeded
    draw of ``samples_per_partition`` samples (0: ``N // num_partitions``, at least 1), so
    partitions may overlap. The result depends only on the arguments.

    Args:
        labels: Class label (or, for ``"iid"`` and ``"resample"``, any target) of each
            sample, shape ``(N,)``.
        num_partitions: Number of partitions, 1..N.
        partitioner: ``"iid"``, ``"dirichlet"`` or ``"shards"``.
        seed: Seed of every random choice.
        alpha: Dirichlet concentration; smaller means more label skew. Must be > 0.
        shards_per_partition: Shards (label-sorted blocks) per partition for ``"shards"``.
        samples_per_partition: Partition size for ``"resample"`` (0: automatic).

    Returns:
        One read-only ``int64`` array of indices into ``labels`` per partition. IID partitions
        cover every index exactly once; Dirichlet partitions too, and none is empty (an empty
        one gets a sample from the largest); shard partitions are disjoint and together hold
        ``num_partitions * shards_per_partition`` equal shards.

    Raises:
        ConfigError: An argument is out of range or the partitioner is unknown.
        DataError: ``labels`` is not a non-empty 1-D integer array.
    """
    mode = _as_partitioner(partitioner)
    y = _check_labels(labels, mode)
    n = int(y.shape[0])
    num_partitions = _as_int(num_partitions, "num_partitions")
    seed = check_seed(seed)
    if mode is Partitioner.RESAMPLE:
        if num_partitions < 1:
            raise ConfigError(f"num_partitions must be at least 1, got {num_partitions}.")
        return _resample(n, num_partitions, seed, samples_per_partition)
    if not 1 <= num_partitions <= n:
        raise ConfigError(
            f"num_partitions must be between 1 and the number of samples ({n}), "
            f"got {num_partitions}; for more clients than samples use the 'resample' "
            "partitioner (each client draws its own samples)."
        )
    alpha, shards_per_partition = _check_options(alpha, shards_per_partition)
    if mode is Partitioner.SHARDS and num_partitions * shards_per_partition > n:
        raise ConfigError(
            f"{num_partitions} partitions x {shards_per_partition} shards need at least "
            f"{num_partitions * shards_per_partition} samples but there are {n}; use at most "
            f"{n // shards_per_partition} partitions or fewer shards per partition."
        )
    if mode is Partitioner.IID:
        parts = _iid(n, num_partitions, seed)
    else:
        parts = _run_flwr_partitioner(y, num_partitions, mode, seed, alpha, shards_per_partition)
    if mode is Partitioner.DIRICHLET:
        _fill_empty_partitions(parts)
    result = []
    for part in parts:
        array = np.asarray(part, dtype=np.int64)
        array.flags.writeable = False
        result.append(array)
    return result


def _iid(n: int, num_partitions: int, seed: int) -> list[list[int]]:
    """flwr-datasets' IID partitions of a dataset shuffled with ``seed``, without the datasets.

    ``Dataset.shuffle(seed)`` permutes with ``np.random.default_rng(seed).permutation(n)``;
    ``IidPartitioner`` then takes contiguous shards, the first ``n % k`` one sample longer.
    """
    order = np.random.default_rng(seed).permutation(n)
    size, extra = divmod(n, num_partitions)
    parts = []
    for i in range(num_partitions):
        start = size * i + min(i, extra)
        parts.append(order[start : start + size + (1 if i < extra else 0)].tolist())
    return parts


def _resample(n: int, num_partitions: int, seed: int, size: int) -> list[np.ndarray]:
    """Each partition draws ``size`` distinct samples with its own generator (may overlap)."""
    if size < 0:
        raise ConfigError(f"samples_per_partition must be >= 0, got {size}.")
    size = min(n, size or max(1, n // num_partitions))
    parts = []
    for i in range(num_partitions):
        rng = np.random.default_rng([seed, i])
        part = np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
        part.flags.writeable = False
        parts.append(part)
    return parts


def _run_flwr_partitioner(
    y: np.ndarray, num_partitions: int, mode: Partitioner, seed: int, alpha: float, shards: int
) -> list[list[int]]:
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        ShardPartitioner,
    )

    n = int(y.shape[0])
    dataset = Dataset.from_dict({"label": y.tolist(), "idx": list(range(n))})
    partitioner: IidPartitioner | DirichletPartitioner | ShardPartitioner
    if mode is Partitioner.IID:
        # IidPartitioner takes contiguous blocks; shuffle first so the blocks are random.
        dataset = dataset.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif mode is Partitioner.DIRICHLET:
        # min_partition_size=0: the retry loop for a minimum size cannot terminate with a few
        # samples per client (e.g. 4,000 samples for 1,000 clients).
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=0,
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=shards,
            shard_size=max(1, n // (num_partitions * shards)),
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = dataset
    try:
        # errstate: with a tiny alpha every Dirichlet share left to a class can underflow to 0
        # and flwr-datasets would divide 0 by 0, silently producing garbage partitions.
        with warnings.catch_warnings(), np.errstate(invalid="raise", divide="raise"):
            # pyarrow deprecation noise from Dataset.sort inside ShardPartitioner.
            warnings.simplefilter("ignore", FutureWarning)
            return [list(partitioner.load_partition(i)["idx"]) for i in range(num_partitions)]
    except FloatingPointError as exc:
        raise ConfigError(
            f"alpha={alpha} is too small to make {num_partitions} Dirichlet partitions of {n} "
            "samples (the sampled shares underflow to zero); use a larger alpha, e.g. 0.05."
        ) from exc
    except ValueError as exc:
        raise ConfigError(
            f"Cannot make {num_partitions} {mode.value} partitions of {n} samples: {exc}"
        ) from exc


def _fill_empty_partitions(parts: list[list[int]]) -> None:
    """Move one sample from the currently largest partition into each empty one."""
    empty = [i for i, part in enumerate(parts) if not part]
    if not empty:
        return
    logger.debug("Filling %d empty Dirichlet partitions", len(empty))
    for i in empty:
        largest = max(range(len(parts)), key=lambda j: len(parts[j]))
        parts[i].append(parts[largest].pop())


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
    partitions = _partitions_cached(
        os.fspath(source), num_partitions, mode, seed, alpha_value, shards, samples, fraction, kind
    )
    train = load_dataset(source, test_fraction=fraction, seed=seed, task=kind).train
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
