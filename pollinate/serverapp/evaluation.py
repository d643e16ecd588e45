"""Evaluating the global model: centrally on the server's test split, and federated on
clients' held-out local splits.

Federated evaluation under DP-SGD releases only noised counts from each client, charged to
its accountant; :func:`federated_eval` records each release in the privacy ledger and
returns the ratio of the noised sums.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ConfigRecord, Message

from pollinate.clientapp.training import EvalResult, seed_for
from pollinate.clientapp.training import evaluate as evaluate_model
from pollinate.config import SampleDP
from pollinate.data import DatasetSplit
from pollinate.errors import PollinateError
from pollinate.log import logger
from pollinate.serverapp.nodes import SampledGrid, reply_node
from pollinate.serverapp.state import RunState, to_array_record
from pollinate.tasks import Task

__all__ = ["accuracy_of", "central_eval", "describe_eval", "federated_eval"]


def central_eval(
    model: torch.nn.Module, arrays: dict[str, np.ndarray], data: DatasetSplit, task: Task
) -> EvalResult:
    """Loss, accuracy and every metric of ``task`` for ``arrays`` (loaded into ``model``) on
    the server's test split."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return evaluate_model(model, data.test.x, data.test.y, task=task, metrics=True)


def accuracy_of(result: EvalResult) -> float | None:
    """The accuracy of an evaluation, None for a task without one (regression)."""
    return None if math.isnan(result.accuracy) else result.accuracy


def describe_eval(result: EvalResult, task: Task) -> str:
    """``accuracy 0.9120, loss 0.3012`` or ``rmse 3.2, mape 4.1, loss 10.2``: for the log."""
    shown = [f"{name} {result.metrics[name]:.4g}" for name in task.metric_names
             if name in result.metrics]  # fmt: skip
    return ", ".join([*shown, f"loss {result.loss:.4g}"])


def federated_eval(run: RunState, rnd: int) -> float | None:
    """Accuracy of the global model on the sampled clients' held-out local splits.

    Under DP each client releases only noised counts, charged to its accountant; the ledger
    records that release, and the accuracy is the ratio of the noised sums. ``None`` when
    federated evaluation is off or no client answered.
    """
    settings = run.settings
    size = settings.evaluate_size(len(run.directory))
    if size == 0:
        return None
    chosen = run.directory.sample(size, np.random.default_rng(seed_for(settings.seed, rnd, 14)))
    messages = list(
        run.strategy.configure_evaluate(
            rnd,
            to_array_record(run.arrays),
            ConfigRecord(dict(run.cfg)),
            SampledGrid(run.grid, chosen),
        )
    )
    replies = [
        r
        for r in run.grid.send_and_receive(messages, timeout=settings.round_timeout)
        if not r.has_error() and "metrics" in r.content.metric_records
    ]
    answered = [
        r
        for r in replies
        if int(r.content.metric_records["metrics"].get("declined", 0)) == 0  # type: ignore[arg-type]
    ]
    if not answered:
        return None
    if settings.dp != SampleDP.DPSGD:
        metrics = run.strategy.aggregate_evaluate(rnd, answered)
        if metrics is None or "eval-accuracy" not in metrics:
            return None
        return float(metrics["eval-accuracy"])  # type: ignore[arg-type]
    return _noised_accuracy(run, rnd, answered, messages)


def _noised_accuracy(
    run: RunState, rnd: int, answered: list[Message], sent: list[Message]
) -> float | None:
    """The ratio of the clients' noised correct and total counts; each release is recorded."""
    correct = count = 0.0
    for reply in answered:
        m = reply.content.metric_records["metrics"]
        correct += float(m.get("eval-correct-noised", 0.0))  # type: ignore[arg-type]
        count += float(m.get("eval-count-noised", 0.0))  # type: ignore[arg-type]
        key = run.directory.key_of(reply_node(reply, sent))
        try:
            run.ledger.record_client(
                server_round=rnd, client=key, release="evaluate",
                epsilon=float(m.get("epsilon", 0.0)),  # type: ignore[arg-type]
                delta=float(m.get("delta", run.settings.target_delta)),  # type: ignore[arg-type]
                noise_multiplier=float(m.get("noise-multiplier", 0.0)),  # type: ignore[arg-type]
                sample_rate=1.0, steps=1,
            )  # fmt: skip
        except (ValueError, PollinateError) as err:
            logger.warning("round %d: evaluation of client %s not recorded: %s", rnd, key, err)
    return min(1.0, max(0.0, correct / count)) if count > 0 else None
