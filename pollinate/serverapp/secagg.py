"""Secure aggregation (SecAgg+) for a training round: the server only sees the sum.

Flower 1.42 implements SecAgg+ as ``flwr.server.workflow.SecAggPlusWorkflow``, written for
the legacy API: it asks a legacy ``Strategy.configure_fit`` for ``(ClientProxy, FitIns)``
pairs, runs the four protocol stages (setup, share keys, collect masked vectors, unmask) as
``train`` messages, and hands the unmasked weighted average to ``Strategy.aggregate_fit``.
pollinate's round loop uses the Message-API strategies, so :func:`secure_round` runs the
workflow for one round through a small legacy facade (:class:`_RoundFacade`):

- the facade's ``configure_fit`` returns the round's sampled nodes with the same arrays and
  config the Message-API strategy built (``FitIns``);
- the ClientApp's ``secaggplus_mod`` (see :mod:`pollinate.clientapp.secagg`) masks each client's
  weighted parameters; the client's metrics (epsilon, steps, examples) travel unmasked in
  ``FitRes.metrics``, as they do without SecAgg;
- the facade's ``aggregate_fit`` receives the weighted average only.

:func:`secure_round` returns one reply per client that completed the protocol, carrying that
client's own metrics and the *aggregate* arrays, so the rest of the round (ledger, triage,
the Message-API strategy, client-level DP noise) runs unchanged: averaging identical arrays
gives the aggregate back, and ``DifferentialPrivacyClientSideFixedClipping`` adds its noise
to it. Individual updates are never seen by the server, so per-update validation is limited
to the aggregate, and server-side clipping and robust aggregation are refused with SecAgg.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from pollinate.config import RunSettings
from pollinate.protocol import SECAGG_MAX_WEIGHT_KEY, SECAGG_TASK_KEY, SECAGG_WEIGHT_KEY

__all__ = ["secure_round"]

logger = logging.getLogger("pollinate")


class _RoundFacade(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow talks to, for one round."""

    def __init__(self, fit: list[tuple[ClientProxy, FitIns]]) -> None:
        self.fit = fit
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.aggregate: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.fit

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = list(results)
        # SecAggPlusWorkflow put the unmasked weighted average into every result
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def _config(record: ConfigRecord) -> dict[str, Scalar]:
    """The task config as a legacy FitIns config: legacy configs hold scalars only, so the
    task travels as one JSON string (its lists, such as input-shape, included)."""
    return {SECAGG_TASK_KEY: json.dumps(dict(record.items()))}


def secure_round(
    grid: Grid,
    messages: Sequence[Message],
    server_round: int,
    settings: RunSettings,
    *,
    max_weight: float,
) -> list[Message]:
    """Run one training round under SecAgg+; replies carry each client's metrics and the
    aggregate (weighted average) arrays. Clients that dropped out are simply absent.

    ``max_weight`` bounds a client's weight (its examples, or 1 with client-level DP): the
    protocol scales each update by weight / max_weight before quantizing it.
    """
    from pollinate.serverapp.strategy import weight_key_for

    weight_key = weight_key_for(settings)
    if not messages:
        return []
    first = messages[0].content
    names = list(first.array_records["arrays"].keys())
    fit: list[tuple[ClientProxy, FitIns]] = []
    for msg in messages:
        arrays = msg.content.array_records["arrays"]
        config = _config(msg.content.config_records["config"])
        config[SECAGG_WEIGHT_KEY] = weight_key
        config[SECAGG_MAX_WEIGHT_KEY] = max_weight
        parameters = ndarrays_to_parameters([arrays[k].numpy() for k in names])
        node = GridClientProxy(msg.metadata.dst_node_id, grid, 0)
        fit.append((node, FitIns(parameters, config)))
    facade = _RoundFacade(fit)
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=facade)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=settings.secagg_share_fraction,
        reconstruction_threshold=settings.secagg_threshold_fraction,
        max_weight=max_weight,
        clipping_range=settings.secagg_clipping_range,
        timeout=settings.round_timeout,
    )
    workflow(grid, context)
    if facade.aggregate is None:
        logger.warning("round %d: secure aggregation did not complete", server_round)
        return []
    average = parameters_to_ndarrays(facade.aggregate)
    dtypes = {k: first.array_records["arrays"][k].numpy().dtype for k in names}
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = []
    for client, fitres in facade.results:
        arrays = ArrayRecord(
            OrderedDict(
                (k, Array(np.ascontiguousarray(v, dtype=dtypes[k])))
                for k, v in zip(names, average, strict=True)
            )
        )
        metrics: dict[str, Any] = {
            k: v for k, v in fitres.metrics.items() if isinstance(v, int | float)
        }
        # every reply holds the same, already weighted average: equal weights keep it as is
        # (a client's own count never travels in clear)
        metrics[weight_key] = 1
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=by_node[int(client.cid)]))
    logger.info(
        "round %d: secure aggregation of %d of %d clients", server_round, len(replies),
        len(messages),
    )  # fmt: skip
    return replies
