"""The client side of a SecAgg+ round: Flower's ``secaggplus_mod`` speaks the legacy
``FitIns``/``FitRes`` records; this adapter turns them into the ClientApp's own train message
and its reply back, so the same DP-SGD, policy and accounting run under secure aggregation.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from pollinate.errors import PollinateError
from pollinate.models import build_model
from pollinate.protocol import (
    ACCOUNTING_KEYS,
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES_KEY,
    SECAGG_MAX_WEIGHT_KEY,
    SECAGG_TASK_KEY,
    SECAGG_WEIGHT_KEY,
    ClientTask,
)

__all__ = ["train_for_secagg"]


def train_for_secagg(
    msg: Message, context: Context, train: Callable[[Message, Context], Message]
) -> Message:
    """Adapt a SecAgg+ train message (legacy ``FitIns`` records) to ``train`` and its
    reply back to a legacy ``FitRes``, which ``secaggplus_mod`` masks before it leaves.

    The weight is the strategy's (``num-examples``, or ``client-weight`` under any DP), capped
    at the protocol's ``max_weight``; only the accounting (epsilon, steps, rate, noise) travels
    in clear beside the masked update, never a metric such as loss or accuracy; a client that
    declines contributes zeros with weight 0, and its decline still reaches the server in the
    metrics.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = json.loads(str(fitins.config[SECAGG_TASK_KEY]))
    weight_key = str(fitins.config.get(SECAGG_WEIGHT_KEY, NUM_EXAMPLES_KEY))
    max_weight = float(fitins.config.get(SECAGG_MAX_WEIGHT_KEY, 1000.0))
    task = ClientTask.from_config(ConfigRecord(config))
    model = build_model(
        task.model, input_shape=task.input_shape, num_classes=task.num_outputs, fix=task.fix_model
    )
    names = list(model.state_dict())
    sent = parameters_to_ndarrays(fitins.parameters)
    if len(sent) != len(names):
        raise PollinateError(
            f"secure aggregation: the server sent {len(sent)} tensors, {task.model} has "
            f"{len(names)}; server and device run different pollinate versions"
        )
    arrays = ArrayRecord()
    for name, value in zip(names, sent, strict=True):
        arrays[name] = Array(value)
    msg.content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(config)})
    reply = train(msg, context)
    if reply.has_error():
        return reply
    metrics = reply.content.metric_records[METRICS]
    trained = reply.content.array_records.get(ARRAYS)
    if trained is None:  # declined
        params, weight = [np.zeros_like(a) for a in sent], 0
    else:
        params = [trained[name].numpy() for name in names]
        weight = int(min(float(metrics.get(weight_key, 1)), max_weight))  # type: ignore[arg-type]
    # travels in clear beside the masked update: the accounting only, never a metric
    scalars = {
        k: v for k, v in metrics.items() if k in ACCOUNTING_KEYS and isinstance(v, int | float)
    }
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), weight, scalars)  # type: ignore[arg-type]
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
