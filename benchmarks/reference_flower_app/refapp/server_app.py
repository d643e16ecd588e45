"""refapp: the ServerApp (Flower's `opacus_fl/server_app.py`, Message API).

FedAvg over a sample of the nodes each round, no federated evaluation, and a central
evaluation of the global model on the test split after every round (and before round 1).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from refapp.task import config_value, load_test_data, make_model, test

# Opacus logger seems to change the flwr logger to DEBUG level. Set back to INFO
logging.getLogger("flwr").setLevel(logging.INFO)

TIMINGS_ENV = "REFAPP_TIMINGS"

app = ServerApp()


def aggregate_train(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean training loss and the max/mean epsilon of the round's clients."""
    metrics = [rd.metric_records["metrics"] for rd in replies]
    weights = [float(m[weight_key]) for m in metrics]  # type: ignore[arg-type]
    losses = [float(m["train-loss"]) for m in metrics]  # type: ignore[arg-type]
    epsilons = [float(m["epsilon"]) for m in metrics]  # type: ignore[arg-type]
    total = sum(weights)
    out: dict[str, float] = {
        "train-loss": sum(w * x for w, x in zip(weights, losses, strict=True)) / total
        if total
        else float("nan")
    }
    if epsilons:
        out["max-epsilon"] = max(epsilons)
        out["mean-epsilon"] = sum(epsilons) / len(epsilons)
    return MetricRecord(out)  # type: ignore[arg-type]


def get_evaluate_fn(context: Context) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Central evaluation on the test split; also logs a timing line to $REFAPP_TIMINGS."""
    test_loader = load_test_data(context)
    device = torch.device("cpu")
    timings = os.environ.get(TIMINGS_ENV)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net = make_model(context)
        net.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        loss, accuracy = test(net, test_loader, device)
        if timings:
            line = {"round": server_round, "t": time.time(), "accuracy": accuracy}
            with open(timings, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    return evaluate


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for ``num-server-rounds`` rounds."""
    num_rounds = int(config_value(context, "num-server-rounds"))

    initial_arrays = ArrayRecord(make_model(context).state_dict())

    strategy = FedAvg(
        fraction_train=float(config_value(context, "fraction-train")),
        fraction_evaluate=float(config_value(context, "fraction-evaluate")),
        train_metrics_aggr_fn=aggregate_train,
    )

    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=num_rounds,
        evaluate_fn=get_evaluate_fn(context),
    )
    print(result)
