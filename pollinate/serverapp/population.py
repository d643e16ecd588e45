"""A population known without asking: nodes ``first .. first + count - 1``, node ``first + i``
holding partition ``i`` under the client key :func:`~pollinate.protocol.partition_key` (i).

The fast engine's nodes are such a population (:class:`~pollinate.simulation.local_grid.
LocalGrid`), so the server never sends a million ``query`` messages nor keeps a million keys:
:class:`PartitionRange` answers a node's key by arithmetic, and samples in client-key order
touching only the clients that have a history.

Sampling gives exactly the nodes :class:`~pollinate.serverapp.nodes.NodeDirectory` gives for
the same keys, generator and predicate (the same draws over the same ordered, filtered list),
so a run samples the same clients on either engine. That needs one promise from the caller:
``allowed`` answers alike for every client outside ``known`` (those have no history, so the
privacy rules treat them alike); it is asked once for them, and once per known client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from pollinate.protocol import partition_key

__all__ = ["FRESH", "PartitionRange"]

#: the key ``allowed`` is asked for a client without history (no client is called this)
FRESH = ""

# Keys are "p" + the partition zero-padded to 6 digits: below this, key order is number order.
_PADDED = 10**6


class PartitionRange:
    """Nodes ``first .. first + count - 1``; node ``first + i`` is partition ``i``."""

    def __init__(self, first: int, count: int) -> None:
        if count < 1:
            raise ValueError(f"a population needs at least one node, got {count}")
        self.first = first
        self.count = count
        self._rank: np.ndarray | None = None  # partition -> position in key order
        self._order: np.ndarray | None = None  # position in key order -> partition

    def __len__(self) -> int:
        return self.count

    def key_of(self, node_id: int) -> str | None:
        """The client key of ``node_id``, or ``None`` if it is not one of these nodes."""
        partition = node_id - self.first
        return partition_key(partition) if 0 <= partition < self.count else None

    def node_ids(self) -> range:
        """Every node id, in partition order."""
        return range(self.first, self.first + self.count)

    def nodes(self) -> dict[int, str]:
        """Node id -> client key of every node (materialised: for small populations)."""
        return {self.first + i: partition_key(i) for i in range(self.count)}

    # ------------------------------------------------------------ sampling

    def sample(
        self,
        size: int,
        rng: np.random.Generator,
        *,
        allowed: Callable[[str], bool] | None = None,
        known: Iterable[str] = (),
    ) -> list[int]:
        """``size`` node ids drawn uniformly without replacement, in client-key order, among
        the clients ``allowed`` accepts (see the module's note on ``known``)."""
        excluded, pool = self._filter(allowed, known)
        available = self.count - len(excluded) if pool is None else len(pool)
        size = min(size, available)
        picks = np.sort(rng.choice(available, size=size, replace=False))
        return self._nodes_at(self._positions(picks, excluded, pool))

    def sample_poisson(
        self,
        rate: float,
        rng: np.random.Generator,
        *,
        allowed: Callable[[str], bool] | None = None,
        known: Iterable[str] = (),
    ) -> list[int]:
        """Every allowed client independently with probability ``rate`` (one coin each from
        ``rng``, in client-key order)."""
        excluded, pool = self._filter(allowed, known)
        available = self.count - len(excluded) if pool is None else len(pool)
        picks = np.flatnonzero(rng.random(available) < rate)
        return self._nodes_at(self._positions(picks, excluded, pool))

    def _filter(
        self, allowed: Callable[[str], bool] | None, known: Iterable[str]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The key-order positions to skip, or (when a fresh client is not allowed) the only
        positions to draw from, both sorted."""
        none = np.zeros(0, dtype=np.int64)
        if allowed is None:
            return none, None
        positions = {key: self._position_of(key) for key in set(known)}
        members = sorted((p, key) for key, p in positions.items() if p is not None)
        if allowed(FRESH):
            skip = [p for p, key in members if not allowed(key)]
            return np.asarray(skip, dtype=np.int64), None
        keep = [p for p, key in members if allowed(key)]
        return none, np.asarray(keep, dtype=np.int64)

    @staticmethod
    def _positions(picks: np.ndarray, excluded: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
        """Key-order positions of the ``picks``-th allowed clients (``picks`` sorted)."""
        picks = picks.astype(np.int64)
        if pool is not None:
            return np.asarray(pool[picks], dtype=np.int64)
        if not len(excluded):
            return picks
        # before the j-th skipped position lie excluded[j] - j allowed ones
        allowed_before = excluded - np.arange(len(excluded), dtype=np.int64)
        return np.asarray(picks + np.searchsorted(allowed_before, picks, side="right"))

    # ------------------------------------------------------------ key order

    def _position_of(self, key: str) -> int | None:
        """Where ``key`` stands in key order, or ``None`` if no node here has it."""
        if not key.startswith("p") or not key[1:].isdigit():
            return None
        partition = int(key[1:])
        if not 0 <= partition < self.count or partition_key(partition) != key:
            return None
        if self.count <= _PADDED:
            return partition
        return int(self._ranks()[partition])

    def _nodes_at(self, positions: np.ndarray) -> list[int]:
        if self.count > _PADDED:
            positions = self._orders()[positions]
        return (positions + self.first).tolist()  # type: ignore[no-any-return]

    def _orders(self) -> np.ndarray:
        """Partitions in key order (only past a million, where keys grow a digit)."""
        if self._order is None:
            keys = np.array([partition_key(i) for i in range(self.count)])
            self._order = np.argsort(keys, kind="stable")
        return self._order

    def _ranks(self) -> np.ndarray:
        if self._rank is None:
            order = self._orders()
            self._rank = np.empty_like(order)
            self._rank[order] = np.arange(len(order))
        return self._rank
