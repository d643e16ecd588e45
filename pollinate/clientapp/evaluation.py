"""The ClientApp's federated evaluation: the global model on this node's held-out split.

Never on the training samples. Without DP the reply carries the loss, accuracy and count; under
DP only the number of correct predictions and of samples, each with Gaussian noise (std
``eval-noise-multiplier * sqrt(2)``: together they change by at most sqrt(2) when one example
is added or removed), and that release is charged to the device's accountant like a training
round.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from pollinate.clientapp.jobs import noise_source, refuse
from pollinate.clientapp.local import (
    accountant_file,
    client_key,
    device_ledger,
    local_data,
    model_from,
    restore_accountant,
    save_accountant,
    split_local,
)
from pollinate.clientapp.policy import DevicePolicy
from pollinate.clientapp.training import EvalResult
from pollinate.clientapp.training import evaluate as evaluate_model
from pollinate.errors import PrivacyBudgetError, PrivacyLedgerError
from pollinate.privacy import MechanismStep
from pollinate.privacy.noise import gaussian
from pollinate.protocol import CONFIG, INFO, METRICS, NUM_EXAMPLES_KEY, ClientTask

__all__ = ["evaluate_message", "private_evaluation"]

#: which of a client's releases of a round the evaluation is (for the reproducible test switch)
EVAL_RELEASE = 99


def evaluate_message(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's held-out local split."""
    task = ClientTask.from_config(msg.content.config_records[CONFIG])
    key = client_key(context)
    delta = task.target_delta
    policy = DevicePolicy.from_node_config(context.node_config)
    refusal = policy.refusal(task, evaluate=True)
    if refusal is not None:
        return refuse(msg, context, key, refusal, epsilon=-1.0, delta=delta)
    _, held = split_local(local_data(context, task), task, key)
    if len(held) == 0:
        info = ConfigRecord({"client": key, "declined": "no held-out local split to evaluate on"})
        return Message(
            RecordDict({METRICS: MetricRecord({"declined": 1}), INFO: info}), reply_to=msg
        )
    result = evaluate_model(model_from(msg, task), held.x, held.y)
    if not task.dp:
        metrics = MetricRecord(
            {
                NUM_EXAMPLES_KEY: result.num_examples,
                "eval-loss": result.loss if math.isfinite(result.loss) else 0.0,
                "eval-accuracy": result.accuracy,
            }
        )
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)
    return private_evaluation(msg, context, task, key, policy, result)


def private_evaluation(
    msg: Message,
    context: Context,
    task: ClientTask,
    key: str,
    policy: DevicePolicy,
    result: EvalResult,
) -> Message:
    """Noised counts of the evaluation, charged to this client's accountant."""
    delta = task.target_delta
    state_file = accountant_file(context, task, key)
    ledger = device_ledger(context)
    try:
        accountant = restore_accountant(context, state_file, ledger, policy)
    except PrivacyLedgerError as err:
        return refuse(msg, context, key, f"refused: {err}", epsilon=-1.0, delta=delta)
    step = MechanismStep(noise_multiplier=task.eval_noise_multiplier, sample_rate=1.0, steps=1)
    try:
        accountant.check_budget(step, delta=delta, budget=policy.budget_for(task))
    except PrivacyBudgetError as err:
        info = ConfigRecord({"client": key, "declined": str(err)})
        declined = MetricRecord({"declined": 1, "epsilon": accountant.epsilon(delta)})
        return Message(RecordDict({METRICS: declined, INFO: info}), reply_to=msg)
    accountant.record(step)
    save_accountant(context, accountant, state_file, ledger)
    counts = torch.tensor(
        [round(result.accuracy * result.num_examples), result.num_examples], dtype=torch.float64
    )
    std = task.eval_noise_multiplier * math.sqrt(2.0)
    source = noise_source(task, key, EVAL_RELEASE)
    noisy = counts + gaussian((2,), std, source.generator(step=0), dtype=torch.float64)
    metrics = MetricRecord(
        {
            "eval-correct-noised": float(noisy[0]),
            "eval-count-noised": float(noisy[1]),
            "client-weight": 1,
            "epsilon": accountant.epsilon(delta),
            "delta": delta,
            "noise-multiplier": task.eval_noise_multiplier,
            "sample-rate": 1.0,
            "steps": 1,
        }
    )
    content = RecordDict({METRICS: metrics, INFO: ConfigRecord({"client": key})})
    return Message(content, reply_to=msg)
