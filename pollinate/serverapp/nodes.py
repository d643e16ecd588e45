"""Who is connected, and sampling by stable client identity.

Flower's node ids are random per launch (simulation registers fresh ones every time), so a
run sampled by node id could not be resumed reproducibly. The ServerApp asks each new node
once for its stable client key (``query`` message) and samples in key order with a seeded
generator: the same seed and round give the same clients, before and after a restart.

A grid whose nodes are partitions by construction (the fast engine's, ``partition_nodes``)
is not asked: its keys follow from the node ids (:mod:`pollinate.serverapp.population`), so
the directory's cost is in the clients sampled, not in the population.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from pollinate.errors import PollinateError
from pollinate.log import logger
from pollinate.protocol import reads_packed
from pollinate.serverapp.population import PartitionRange

__all__ = ["QUERY_TIMEOUT_S", "NodeDirectory", "SampledGrid", "reply_node"]

#: How long a node has to tell its client key. A reply lost on the way (a busy SuperLink's
#: SQLite state says "database is locked") must not hold the round for its whole timeout.
QUERY_TIMEOUT_S = 60.0
#: ... plus this per node asked (Flower's simulation answers one query in about 14 ms)
QUERY_S_PER_NODE = 0.05


def reply_node(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply answers for.

    Replies a node sends carry its id as ``src_node_id``; error replies the SuperLink makes
    itself (message expired, node gone) carry the SuperLink's id instead, so those are traced
    back through ``reply_to_message_id`` to the message that was sent.
    """
    src = reply.metadata.src_node_id
    if src != SUPERLINK_NODE_ID:
        return src
    for message in sent:
        if message.metadata.message_id == reply.metadata.reply_to_message_id:
            return message.metadata.dst_node_id
    return src


class SampledGrid(Grid):
    """A Grid whose ``get_node_ids`` returns a fixed sample; everything else is delegated.

    Flower's strategies sample from ``grid.get_node_ids()``; with ``fraction_train=1`` they
    take exactly the nodes given here.
    """

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class NodeDirectory:
    """Maps connected node ids to stable client keys, learning new nodes as they join."""

    def __init__(self, grid: Grid, *, timeout: float = 120.0) -> None:
        self._grid = grid
        self._timeout = timeout
        self._keys: dict[int, str] = {}
        span: tuple[int, int] | None = getattr(grid, "partition_nodes", None)
        self._range = PartitionRange(*span) if span else None

    def __len__(self) -> int:
        return len(self._range) if self._range is not None else len(self._keys)

    def key_of(self, node_id: int) -> str:
        """The client key of a known node (its node id as text if it never answered)."""
        if self._range is not None:
            key = self._range.key_of(node_id)
            if key is not None:
                return key
        return self._keys.get(node_id, f"n{node_id}")

    def wait_for(self, minimum: int) -> None:
        """Block until at least ``minimum`` nodes are connected (bounded by the timeout)."""
        if self._range is not None:
            if len(self._range) < minimum:
                raise PollinateError(
                    f"the simulation has {len(self._range)} clients but {minimum} are needed; "
                    "simulate more clients or lower min-train-nodes"
                )
            return
        deadline = time.monotonic() + self._timeout
        while len(list(self._grid.get_node_ids())) < minimum:
            if time.monotonic() > deadline:
                have = len(list(self._grid.get_node_ids()))
                raise PollinateError(
                    f"only {have} of the {minimum} nodes needed connected within "
                    f"{self._timeout:.0f} s; start more SuperNodes or lower min-train-nodes"
                )
            time.sleep(0.5)

    def settle(self, *, quiet: float = 1.0, limit: float = 30.0) -> int:
        """Wait until the number of connected nodes stops changing for ``quiet`` seconds.

        Nodes register over a moment (a simulation registers 1000 of them while the ServerApp
        starts); sampling before they are all there would shrink every round's sample.
        """
        if self._range is not None:
            return len(self._range)
        count = len(list(self._grid.get_node_ids()))
        if getattr(self._grid, "static_population", False):
            return count  # every node registered up front (the in-process engine)
        deadline = time.monotonic() + limit
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = len(list(self._grid.get_node_ids()))
            if now != count:
                count, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= quiet:
                break
        return count

    def refresh(self) -> None:
        """Ask nodes not seen before for their client key; forget nodes that left."""
        if self._range is not None:
            return  # every node's key is known without asking
        connected = set(self._grid.get_node_ids())
        for gone in set(self._keys) - connected:
            del self._keys[gone]
        new = sorted(connected - set(self._keys))
        if not new:
            return
        logger.info("identifying %d new node(s)", len(new))
        messages = [
            Message(
                RecordDict({"config": ConfigRecord()}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in new
        ]
        timeout = min(self._timeout, QUERY_TIMEOUT_S + QUERY_S_PER_NODE * len(new))
        packed = 0  # nodes that read the model as one array (transport.PollingGrid sends it so)
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            src = reply_node(reply, messages)
            if reply.has_error():
                logger.warning("node %d did not identify itself: %s", src, reply.error.reason)
                continue
            info = reply.content.config_records.get("info")
            self._keys[src] = str(info["client"]) if info and "client" in info else f"n{src}"
            packed += reads_packed(info)
        known = sum(n in self._keys for n in new)
        logger.info("%d node(s) identified, %d of them read the packed model", known, packed)
        missing = [n for n in new if n not in self._keys]
        if missing:  # not sampled until they answer: asked again at the next refresh
            logger.warning(
                "%d node(s) did not identify themselves within %.0f s; they are asked again "
                "next round", len(missing), timeout,
            )  # fmt: skip

    def nodes(self) -> dict[int, str]:
        """Node id -> client key of every node identified so far."""
        if self._range is not None:
            return self._range.nodes()
        return dict(self._keys)

    def sample_poisson(
        self,
        rate: float,
        rng: np.random.Generator,
        *,
        allowed: Callable[[str], bool] | None = None,
        known: Collection[str] = (),
    ) -> list[int]:
        """Every node (that ``allowed`` accepts) independently with probability ``rate``, from
        ``rng``'s coins, in client-key order.

        ``known``: the clients with a history; ``allowed`` must answer alike for all others
        (a partition population asks it once for them: see :mod:`.population`)."""
        if self._range is not None:
            return self._range.sample_poisson(rate, rng, allowed=allowed, known=known)
        ordered = sorted(self._keys.items(), key=lambda kv: kv[1])
        if allowed is not None:
            ordered = [kv for kv in ordered if allowed(kv[1])]
        coins = rng.random(len(ordered))
        return [node for (node, _), coin in zip(ordered, coins, strict=True) if coin < rate]

    def sample(
        self,
        size: int,
        rng: np.random.Generator,
        *,
        allowed: Callable[[str], bool] | None = None,
        known: Collection[str] = (),
    ) -> list[int]:
        """``size`` node ids chosen uniformly without replacement, in client-key order, among
        the nodes whose client key ``allowed`` accepts (all of them by default); ``known`` as
        for :meth:`sample_poisson`."""
        if self._range is not None:
            return self._range.sample(size, rng, allowed=allowed, known=known)
        ordered = sorted(self._keys.items(), key=lambda kv: kv[1])
        if allowed is not None:
            ordered = [kv for kv in ordered if allowed(kv[1])]
        size = min(size, len(ordered))
        picks = rng.choice(len(ordered), size=size, replace=False)
        return [ordered[i][0] for i in sorted(picks.tolist())]
