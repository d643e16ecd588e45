"""A device that answers as late as a latency model says: stragglers on a real fleet.

``pollinate edge run --emulate-latency SPEC`` puts a :class:`~pollinate.config.latency.
LatencyModel` spec in the node config. Each train message is then answered ``draw(device,
n)`` seconds after it arrived (or when training is done, if that is later), where ``device``
is the node's partition id and ``n`` counts the train messages of this run (kept in the
run's ``Context.state``), so a real fleet and the fast engine's simulated one, given the same
model and seed, have the same slow devices and the same reply times. A drop-out answers
after :data:`DROPPED_S`, long past any round's timeout. The delay is drawn from the public
seed and says nothing about the device's data.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context

from pollinate.config.latency import LatencyModel
from pollinate.log import logger
from pollinate.protocol import NodeKey

__all__ = ["DROPPED_S", "answer_late"]

DROPPED_S = 600.0  #: how late a drop-out answers
_STATE = "pollinate.latency"  #: Context.state record: train messages answered so far


def answer_late(context: Context, received: float) -> None:
    """Sleep until the emulated reply time of this train message (received at monotonic
    ``received``); at once when the node emulates no latency."""
    spec = context.node_config.get(NodeKey.EMULATE_LATENCY)
    if not spec:
        return
    model = LatencyModel.parse(str(spec))
    device = int(context.node_config.get(NodeKey.PARTITION_ID, 0))
    record = context.state.get(_STATE)
    nth = int(record.get("sent", 0)) if isinstance(record, ConfigRecord) else 0  # type: ignore[arg-type]
    context.state[_STATE] = ConfigRecord({"sent": nth + 1})
    seconds = model.draw(device, nth)
    delay = DROPPED_S if seconds is None else seconds
    left = received + delay - time.monotonic()
    logger.info(
        "emulated latency: train message %d of device %d answered after %.1f s%s",
        nth, device, delay, " (a drop-out)" if seconds is None else "",
    )  # fmt: skip
    if left > 0:
        time.sleep(left)
