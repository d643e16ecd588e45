"""Building real Flower messages in tests (no mocks: the same classes the runtime uses)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
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
        return list(self.node_ids)


def train_default_cnn(x: np.ndarray, y: np.ndarray, *, epochs: int = 2) -> torch.nn.Module:
    """The default CNN after plain SGD (lr 0.05, momentum 0.9, batch 32), seeded, in eval mode.

    Shared by the export tests, which need a real trained model (about 95% test accuracy on
    the default data) for parity and accuracy-drop checks to mean something.
    """
    from pollinate.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=tuple(x.shape[1:]), num_classes=10)
    xt = torch.from_numpy(np.array(x))
    yt = torch.from_numpy(np.array(y))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 32):
            idx = order[start : start + 32]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    return model
