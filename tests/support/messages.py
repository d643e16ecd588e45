"""Building real Flower messages in tests (no mocks: the same classes the runtime uses)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1


def set_identity(node_id: int = SERVER_NODE) -> None:
    """Flower 1.42 needs the process' task identity before a Message can be built."""
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = node_id


def reply_from(
    node_id: int,
    arrays: Mapping[str, np.ndarray] | None,
    metrics: Mapping[str, int | float],
    info: Mapping[str, str] | None = None,
) -> Message:
    """A train reply from ``node_id`` as a ClientApp would send it."""
    set_identity(SERVER_NODE)
    request = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=node_id, message_type="train"
    )
    set_identity(node_id)
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if arrays is not None:
        content["arrays"] = ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))
    if info is not None:
        content["info"] = ConfigRecord(dict(info))
    reply = Message(content, reply_to=request)
    set_identity(SERVER_NODE)
    return reply


class NodeListGrid:
    """The part of Flower's Grid that strategies use while configuring: the node list."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        """The node ids, as a new list (as Flower's Grid answers)."""
        return list(self.node_ids)
