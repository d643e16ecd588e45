"""Splitting a training set among simulated clients with flwr-datasets partitioners."""

from __future__ import annotations

import functools
import operator
import warnings
from enum import StrEnum
from typing import Any

import numpy as np

from pollinate.data._datasets import (
    check_seed,
)
from pollinate.errors import ConfigError, DataError
from pollinate.log import logger


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
    _check_iid_count(n, num_partitions)
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


def _check_iid_count(n: int, num_partitions: int) -> None:
    if not 1 <= num_partitions <= n:
        raise ConfigError(
            f"num_partitions must be between 1 and the number of samples ({n}), "
            f"got {num_partitions}; for more clients than samples use the 'resample' "
            "partitioner (each client draws its own samples)."
        )


def _iid(n: int, num_partitions: int, seed: int) -> list[list[int]]:
    """flwr-datasets' IID partitions of a dataset shuffled with ``seed``, without the datasets.

    ``Dataset.shuffle(seed)`` permutes with ``np.random.default_rng(seed).permutation(n)``;
    ``IidPartitioner`` then takes contiguous shards, the first ``n % k`` one sample longer.
    """
    order = _iid_order(n, seed)
    return [order[_iid_slice(n, num_partitions, i)].tolist() for i in range(num_partitions)]


@functools.lru_cache(maxsize=4)
def _iid_order(n: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    order.flags.writeable = False
    return order


def _iid_slice(n: int, num_partitions: int, i: int) -> slice:
    size, extra = divmod(n, num_partitions)
    start = size * i + min(i, extra)
    return slice(start, start + size + (1 if i < extra else 0))


def _resample_size(n: int, num_partitions: int, size: int) -> int:
    if size < 0:
        raise ConfigError(f"samples_per_partition must be >= 0, got {size}.")
    return min(n, size or max(1, n // num_partitions))


def _resample(n: int, num_partitions: int, seed: int, size: int) -> list[np.ndarray]:
    """Each partition draws ``size`` distinct samples with its own generator (may overlap)."""
    size = _resample_size(n, num_partitions, size)
    return [_resample_one(n, seed, i, size) for i in range(num_partitions)]


def _resample_one(n: int, seed: int, i: int, size: int) -> np.ndarray:
    """Partition ``i`` of ``"resample"``: its own seeded draw, made without the others."""
    rng = np.random.default_rng([seed, i])
    part = np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
    part.flags.writeable = False
    return part


def partition_sizes(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: Partitioner | str,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    samples_per_partition: int = 0,
) -> set[int]:
    """The distinct partition sizes :func:`partition_indices` would make, with the same
    checks and errors; for ``"iid"`` and ``"resample"`` without making a partition (cheap
    for any population)."""
    mode = _as_partitioner(partitioner)
    if mode not in (Partitioner.IID, Partitioner.RESAMPLE):
        return {
            len(p)
            for p in partition_indices(
                labels, num_partitions, mode, seed=seed, alpha=alpha,
                shards_per_partition=shards_per_partition,
                samples_per_partition=samples_per_partition,
            )
        }  # fmt: skip
    n = int(_check_labels(labels, mode).shape[0])
    num_partitions = _as_int(num_partitions, "num_partitions")
    check_seed(seed)
    if mode is Partitioner.RESAMPLE:
        if num_partitions < 1:
            raise ConfigError(f"num_partitions must be at least 1, got {num_partitions}.")
        return {_resample_size(n, num_partitions, samples_per_partition)}
    _check_iid_count(n, num_partitions)
    _check_options(alpha, shards_per_partition)
    size, extra = divmod(n, num_partitions)
    return {size, size + 1} if extra else {size}


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
