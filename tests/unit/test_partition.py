"""Tests of pollinate.data partitioning: partition_indices and load_partition."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.data import (
    ArrayDataset,
    Partitioner,
    load_dataset,
    load_partition,
    partition_indices,
)
from pollinate.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

PROPERTY = settings(max_examples=25, deadline=None, database=None)


@st.composite
def labels_and_partitions(draw: st.DrawFn, shards: int = 1) -> tuple[np.ndarray, int]:
    """Draw a label array and a feasible number of partitions."""
    labels = draw(st.lists(st.integers(0, 9), min_size=max(2, shards), max_size=300))
    num_partitions = draw(st.integers(1, len(labels) // shards))
    return np.asarray(labels, dtype=np.int64), num_partitions


def _assert_disjoint_within_range(parts: list[np.ndarray], n: int) -> np.ndarray:
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert len(np.unique(joined)) == len(joined), "partitions overlap"
    assert joined.min() >= 0
    assert joined.max() < n
    for part in parts:
        assert part.dtype == np.int64
        assert not part.flags.writeable
    return joined


def _label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's and the global label mix."""
    num_classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = []
    for part in parts:
        if len(part) == 0:
            continue
        mix = np.bincount(labels[part], minlength=num_classes) / len(part)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


# ------------------------------------------------------------------------------ properties


@PROPERTY
@given(data=labels_and_partitions(), seed=st.integers(0, 2**32 - 1))
def test_iid_partitions_cover_exactly(data: tuple[np.ndarray, int], seed: int) -> None:
    labels, num_partitions = data
    parts = partition_indices(labels, num_partitions, Partitioner.IID, seed=seed)
    assert len(parts) == num_partitions
    joined = _assert_disjoint_within_range(parts, len(labels))
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@PROPERTY
@given(
    data=st.integers(1, 4).flatmap(lambda s: st.tuples(labels_and_partitions(shards=s), st.just(s)))
)
def test_shard_partitions_are_disjoint(data: tuple[tuple[np.ndarray, int], int]) -> None:
    (labels, num_partitions), shards = data
    parts = partition_indices(labels, num_partitions, "shards", seed=1, shards_per_partition=shards)
    assert len(parts) == num_partitions
    joined = _assert_disjoint_within_range(parts, len(labels))
    shard_size = len(labels) // (num_partitions * shards)
    assert len(joined) == num_partitions * shards * shard_size
    assert all(len(p) == shards * shard_size for p in parts)


@PROPERTY
@given(
    data=labels_and_partitions(),
    mode=st.sampled_from(list(Partitioner)),
    seed=st.integers(0, 1000),
    alpha=st.floats(0.1, 10.0),
)
def test_partitions_are_deterministic(
    data: tuple[np.ndarray, int], mode: Partitioner, seed: int, alpha: float
) -> None:
    labels, num_partitions = data
    if mode is Partitioner.SHARDS:
        num_partitions = min(num_partitions, len(labels) // 2)
    first = partition_indices(labels, num_partitions, mode, seed=seed, alpha=alpha)
    second = partition_indices(labels, num_partitions, mode.value, seed=seed, alpha=alpha)
    assert len(first) == len(second) == num_partitions
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@PROPERTY
@given(data=labels_and_partitions(), alpha=st.floats(0.1, 10.0), seed=st.integers(0, 1000))
def test_dirichlet_partitions_cover_exactly_and_are_not_empty(
    data: tuple[np.ndarray, int], alpha: float, seed: int
) -> None:
    labels, num_partitions = data
    parts = partition_indices(labels, num_partitions, "dirichlet", seed=seed, alpha=alpha)
    assert len(parts) == num_partitions
    joined = _assert_disjoint_within_range(parts, len(labels))
    assert len(joined) == len(labels)
    assert all(len(p) > 0 for p in parts)


# ------------------------------------------------------------------------------ examples


def test_seed_changes_partitions() -> None:
    labels = np.repeat(np.arange(10), 50)
    for mode in Partitioner:
        a = partition_indices(labels, 10, mode, seed=0)
        b = partition_indices(labels, 10, mode, seed=1)
        assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True)), mode


def test_dirichlet_small_alpha_is_more_skewed_than_iid() -> None:
    labels = np.repeat(np.arange(10), 100)
    iid = partition_indices(labels, 10, Partitioner.IID, seed=0)
    skewed = partition_indices(labels, 10, Partitioner.DIRICHLET, seed=0, alpha=0.1)
    assert _label_skew(labels, skewed) > _label_skew(labels, iid) + 0.3


def test_shards_give_few_labels_per_partition() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition_indices(labels, 10, "shards", seed=0, shards_per_partition=2)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_many_small_dirichlet_partitions_are_fast() -> None:
    labels = np.repeat(np.arange(10), 400)
    start = time.perf_counter()
    parts = partition_indices(labels, 1000, "dirichlet", seed=0, alpha=0.5)
    assert time.perf_counter() - start < 5.0
    assert len(parts) == 1000
    assert sum(len(p) for p in parts) == 4000


def test_partitioner_enum_values() -> None:
    assert [p.value for p in Partitioner] == ["iid", "dirichlet", "shards", "resample"]
    assert Partitioner("dirichlet") is Partitioner.DIRICHLET
    assert isinstance(Partitioner.IID, str)
    assert str(Partitioner.IID) == "iid"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_partitions": 0}, "between 1 and the number of samples"),
        ({"num_partitions": 21}, r"\(20\)"),
        ({"partitioner": "random"}, "iid, dirichlet, shards"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"shards_per_partition": 0}, "shards_per_partition"),
        ({"partitioner": "shards", "num_partitions": 11}, "at most 10 partitions"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {"num_partitions": 4, "partitioner": "iid"}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=needle):
        partition_indices(np.repeat(np.arange(4), 5), **args)  # type: ignore[arg-type]


def test_tiny_alpha_raises_config_error_instead_of_garbage() -> None:
    # With seed 1 flwr-datasets would divide 0 by 0 (every remaining share underflows).
    with pytest.raises(ConfigError, match="alpha"):
        partition_indices(np.repeat(np.arange(10), 10), 5, "dirichlet", seed=1, alpha=0.001)


def test_bad_labels() -> None:
    with pytest.raises(DataError):
        partition_indices(np.zeros(0, dtype=np.int64), 1, "iid")
    with pytest.raises(DataError, match=r"not class labels.*use the 'iid' or 'resample'"):
        partition_indices(np.array([0.5, 1.0]), 1, "dirichlet")
    # a regression target splits IID: only the number of samples counts
    parts = partition_indices(np.array([0.5, 1.0, 2.5, 3.0]), 2, "iid")
    assert sorted(np.concatenate(parts).tolist()) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ load_partition


@pytest.mark.parametrize("mode", list(Partitioner))
def test_load_partition_1000_clients(mode: Partitioner) -> None:
    train = load_dataset("mnist", seed=0).train
    first = load_partition("mnist", 0, 1000, mode)
    assert isinstance(first, ArrayDataset)
    start = time.perf_counter()
    parts = [load_partition("mnist", i, 1000, mode.value) for i in range(1000)]
    assert time.perf_counter() - start < 1.0
    sizes = [len(p) for p in parts]
    if mode is Partitioner.IID:
        assert sum(sizes) == len(train)
        assert set(sizes) == {len(train) // 1000}
    else:
        assert sum(sizes) <= len(train)
    assert parts[0].x.shape[1:] == (1, 28, 28)
    assert parts[0].x.dtype == np.float32


def test_load_partition_matches_partition_indices() -> None:
    split = load_dataset("digits", test_fraction=0.3, seed=5)
    expected = partition_indices(split.train.y, 7, "dirichlet", seed=5, alpha=0.3)
    for pid in (0, 3, 6):
        got = load_partition("digits", pid, 7, "dirichlet", seed=5, alpha=0.3, test_fraction=0.3)
        np.testing.assert_array_equal(got.y, split.train.y[expected[pid]])
        np.testing.assert_array_equal(got.x, split.train.x[expected[pid]])
    # The partition is a copy: changing it must not touch the cached dataset.
    got.x[...] = -1.0
    assert float(split.train.x.min()) >= 0.0


@pytest.mark.parametrize("partition_id", [-1, 10])
def test_load_partition_id_out_of_range(partition_id: int) -> None:
    with pytest.raises(ConfigError, match="partition_id"):
        load_partition("digits", partition_id, 10, "iid")


def test_load_partition_too_many_partitions() -> None:
    with pytest.raises(ConfigError, match="num_partitions"):
        load_partition("digits", 0, 100_000, "iid")


@pytest.mark.parametrize(("n", "k", "seed"), [(4000, 1000, 42), (103, 7, 0), (4000, 3, 12345)])
def test_iid_partitions_equal_flwr_datasets(n: int, k: int, seed: int) -> None:
    """The numpy IID path gives exactly what flwr-datasets' IidPartitioner gives."""
    from pollinate.data._partition import _run_flwr_partitioner

    labels = np.random.default_rng(0).integers(0, 10, n)
    ours = [p.tolist() for p in partition_indices(labels, k, "iid", seed=seed)]
    assert ours == _run_flwr_partitioner(labels, k, Partitioner.IID, seed, 0.5, 2)


def test_resample_serves_more_clients_than_samples() -> None:
    labels = np.repeat(np.arange(10), 40)  # 400 samples
    parts = partition_indices(labels, 1000, "resample", seed=3, samples_per_partition=4)
    assert len(parts) == 1000
    assert all(len(p) == 4 and len(np.unique(p)) == 4 for p in parts)
    assert all(p.min() >= 0 and p.max() < 400 for p in parts)
    again = partition_indices(labels, 1000, "resample", seed=3, samples_per_partition=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, 1000, "resample", seed=4, samples_per_partition=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    auto = partition_indices(labels, 100, "resample", seed=3)
    assert {len(p) for p in auto} == {4}  # 400 // 100


def test_iid_with_more_clients_than_samples_points_to_resample() -> None:
    with pytest.raises(ConfigError, match="resample"):
        partition_indices(np.arange(10) % 2, 11, "iid")
