"""A population known without asking (the fast engine's) samples exactly the clients that a
directory which asked every node samples, at any size, with or without privacy limits.

The reference directory is the same :class:`LocalGrid` given pollinate's ClientApp
explicitly: its server then learns each key with a real ``query`` message, as under Flower.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.clientapp.app import app as pollinate_app
from pollinate.protocol import partition_key
from pollinate.serverapp.nodes import NodeDirectory
from pollinate.serverapp.population import FRESH, PartitionRange
from pollinate.simulation.local_grid import LocalGrid


def _directories(n: int) -> tuple[NodeDirectory, NodeDirectory]:
    lazy = NodeDirectory(LocalGrid(n))
    asked = NodeDirectory(LocalGrid(n, client_app=pollinate_app))
    asked.refresh()
    return lazy, asked


def test_a_partition_population_needs_no_query_and_knows_every_key() -> None:
    lazy, asked = _directories(50)
    assert len(lazy) == len(asked) == 50
    assert lazy.nodes() == asked.nodes()
    node = next(iter(asked.nodes()))
    assert lazy.key_of(node) == asked.key_of(node) == partition_key(node - min(asked.nodes()))
    assert lazy.key_of(7) == "n7"  # not one of its nodes


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    size=st.integers(0, 60),
    seed=st.integers(0, 2**32 - 1),
    blocked=st.sets(st.integers(0, 299), max_size=40),
    other=st.sets(st.integers(0, 299), max_size=20),
    fresh_allowed=st.booleans(),
    poisson=st.booleans(),
)
def test_sampling_equals_asking_every_node(
    n: int,
    size: int,
    seed: int,
    blocked: set[int],
    other: set[int],
    fresh_allowed: bool,
    poisson: bool,
) -> None:
    lazy, asked = _directories(n)
    blocked_keys = {partition_key(i) for i in blocked}
    # clients with a history: the blocked ones, some that may still train, a key from no node
    known = blocked_keys | {partition_key(i) for i in other} | {"d-elsewhere"}

    def allowed(key: str) -> bool:
        if key in known:
            return key not in blocked_keys
        return fresh_allowed  # a client without history: all alike

    for use in (None, allowed):
        if poisson:
            a = lazy.sample_poisson(0.3, np.random.default_rng(seed), allowed=use, known=known)
            b = asked.sample_poisson(0.3, np.random.default_rng(seed), allowed=use)
        else:
            a = lazy.sample(size, np.random.default_rng(seed), allowed=use, known=known)
            b = asked.sample(size, np.random.default_rng(seed), allowed=use)
        assert a == b


def test_past_a_million_clients_the_order_is_still_the_keys_order() -> None:
    """Keys grow a digit at 1,000,000 ("p1000000" sorts before "p100001"): sampled against
    a plain sort of every key, with a few clients blocked."""
    n = 1_000_012
    first = 1 << 32
    population = PartitionRange(first, n)
    keys = sorted(partition_key(i) for i in range(n))
    blocked = {partition_key(i) for i in (0, 5, 100_001, 1_000_000, 1_000_011)}
    usable = [k for k in keys if k not in blocked]
    for seed in (1, 2):
        picks = np.sort(np.random.default_rng(seed).choice(len(usable), 500, replace=False))
        expected = [first + int(usable[i][1:]) for i in picks]
        got = population.sample(
            500, np.random.default_rng(seed), allowed=lambda k: k not in blocked, known=blocked
        )
        assert got == expected
    tail = population.sample(n, np.random.default_rng(3))  # everyone, in key order
    assert [partition_key(node - first) for node in tail[:3]] == keys[:3]
    assert len(tail) == n


def test_fresh_is_no_client_key_and_bad_sizes_are_refused() -> None:
    assert partition_key(0) != FRESH and not FRESH
    with pytest.raises(ValueError, match="at least one node"):
        PartitionRange(0, 0)
