"""One train request, from the message to the reply: the device's policy and budget checks,
the job to run, and the reply that carries the model and only the mechanism's accounting.

The ClientApp's ``train`` handler and the in-process engine
(:mod:`pollinate.simulation.local_grid`) share these steps; only the training in between
differs (one Opacus run per client, or a whole cohort at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

from pollinate.clientapp.local import (
    accountant_file,
    client_key,
    device_ledger,
    key_int,
    local_data,
    restore_accountant,
    save_accountant,
    split_local,
)
from pollinate.clientapp.policy import DevicePolicy
from pollinate.clientapp.training import TrainResult, TrainSettings, dp_plan, seed_for
from pollinate.data import ArrayDataset
from pollinate.device.ledger import DeviceLedger
from pollinate.errors import PrivacyBudgetError, PrivacyLedgerError
from pollinate.log import logger
from pollinate.privacy import ClientAccountant, MechanismStep
from pollinate.privacy.noise import NoiseSource
from pollinate.protocol import (
    ARRAYS,
    CONFIG,
    INFO,
    METRICS,
    NUM_EXAMPLES_KEY,
    ClientTask,
    record_of,
)

__all__ = [
    "REFUSALS_KEY",
    "TrainJob",
    "begin_train",
    "finish_train",
    "noise_source",
    "planned_step",
    "refuse",
]

REFUSALS_KEY = "pollinate.refusals"


def noise_source(task: ClientTask, key: str, *release: int) -> NoiseSource:
    """Where a release's DP randomness comes from: secret, unless the (test-only) reproducible
    switch is on (a device refuses such a task), which seeds it from the run seed, the round,
    the client and ``release`` (which of the client's releases this round)."""
    if task.reproducible_noise:
        return NoiseSource.for_tests(task.seed, task.server_round, key_int(key), *release)
    return NoiseSource.secure()


def planned_step(task: ClientTask, n: int) -> MechanismStep:
    """The DP-SGD steps this round will take, exactly as Opacus' Poisson loader runs them."""
    rate, per_epoch = dp_plan(n, task.batch_size)
    return MechanismStep(
        noise_multiplier=task.noise_multiplier,
        sample_rate=rate,
        steps=per_epoch * task.local_epochs,
    )


def refuse(
    msg: Message, context: Context, key: str, reason: str, *, epsilon: float, delta: float
) -> Message:
    """The reply to a task the device will not run: counted here and reported to the server."""
    task_cfg = msg.content.config_records.get(CONFIG)
    rnd = int(task_cfg.get("server-round", 0)) if task_cfg is not None else 0  # type: ignore[arg-type]
    ledger = device_ledger(context)
    if ledger is not None:
        total = ledger.note_refusal(reason, run_id=context.run_id, server_round=rnd)
    else:
        counts = context.state.config_records.setdefault(REFUSALS_KEY, ConfigRecord({"total": 0}))
        previous = counts["total"]
        total = (previous if isinstance(previous, int) else 0) + 1
        counts["total"] = total
    logger.warning("client %s refused round %d (%d so far): %s", key, rnd, total, reason)
    metrics = MetricRecord(
        {"declined": 1, "refused": 1, "epsilon": epsilon if math.isfinite(epsilon) else -1.0,
         "delta": delta}
    )  # fmt: skip
    info = ConfigRecord({"client": key, "declined": reason, "refused": reason})
    return Message(RecordDict({METRICS: metrics, INFO: info}), reply_to=msg)


@dataclass
class TrainJob:
    """A train request that passed the budget check: everything needed to train and reply."""

    msg: Message
    task: ClientTask
    key: str
    data: ArrayDataset
    accountant: ClientAccountant
    planned: MechanismStep
    state_file: Path | None
    info: ConfigRecord
    ledger: DeviceLedger | None = None

    @property
    def seed(self) -> int:
        """This client's seed for this round: its non-private randomness only."""
        return seed_for(self.task.seed, self.task.server_round, key_int(self.key))

    @property
    def noise(self) -> NoiseSource:
        """Where this round's DP randomness comes from: secret, unless the (test-only)
        reproducible switch is on, which a device refuses."""
        return noise_source(self.task, self.key)

    @property
    def settings(self) -> TrainSettings:
        """The local training the server asked for, with this round's noise multiplier."""
        t = self.task
        return TrainSettings(
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            momentum=t.momentum,
            dp=t.dp,
            noise_multiplier=self.planned.noise_multiplier,
            max_grad_norm=t.max_grad_norm,
            proximal_mu=t.proximal_mu,
            task=t.learning_task,
            physical_batch_size=t.physical_batch_size,
        )


def begin_train(
    msg: Message, context: Context, *, mirror: bool = True, task: ClientTask | None = None
) -> TrainJob | Message:
    """Parse a train message, check it against this device's policy, restore its accountant.

    Returns the job to run, or the reply that refuses the round (the task asks for weaker
    privacy than the device's policy, or its ledger is lost) or declines it (the planned
    steps would take the client past its budget). ``mirror=False`` keeps the accountant in
    ``Context.state`` only (the in-process simulation journals it itself); ``task``: the
    message's config, already parsed (the in-process simulation parses it once a round).
    """
    if task is None:
        task = ClientTask.from_config(msg.content.config_records[CONFIG])
    key = client_key(context)
    delta = task.target_delta
    policy = DevicePolicy.from_node_config(context.node_config)
    refusal = policy.refusal(task)
    if refusal is not None:
        return refuse(msg, context, key, refusal, epsilon=-1.0, delta=delta)
    data, _ = split_local(local_data(context, task), task, key)
    state_file = accountant_file(context, task, key) if mirror else None
    ledger = device_ledger(context) if mirror else None
    try:
        accountant = restore_accountant(context, state_file, ledger, policy)
    except PrivacyLedgerError as err:
        return refuse(msg, context, key, f"refused: {err}", epsilon=-1.0, delta=delta)
    info = ConfigRecord({"client": key})
    planned = planned_step(task, len(data))
    if task.dp and len(data) > 0:
        try:
            accountant.check_budget(planned, delta=delta, budget=policy.budget_for(task))
        except PrivacyBudgetError as err:
            logger.info("client %s declines round %d: %s", key, task.server_round, err)
            info["declined"] = str(err)
            declined = MetricRecord(
                {"declined": 1, "epsilon": accountant.epsilon(delta), "delta": delta}
            )
            return Message(RecordDict({METRICS: declined, INFO: info}), reply_to=msg)
    return TrainJob(msg, task, key, data, accountant, planned, state_file, info, ledger)


def finish_train(
    job: TrainJob,
    context: Context,
    result: TrainResult,
    state: Mapping[str, np.ndarray],
    *,
    array: Callable[[np.ndarray], Array] = Array,
) -> Message:
    """Record the steps taken in the accountant, save it, and build the reply.

    Under DP the reply carries the model and the mechanism's accounting (epsilon, steps, rate,
    noise) and nothing exact about the local data: no loss, accuracy or sample count.
    ``array`` wraps each tensor of the reply (Flower's ``Array``; the in-process engine
    passes one that skips serialization).
    """
    task, accountant = job.task, job.accountant
    delta = task.target_delta
    epsilon = math.inf
    if task.dp and result.steps > 0:
        accountant.record(
            MechanismStep(
                noise_multiplier=job.planned.noise_multiplier,
                sample_rate=result.sample_rate,
                steps=result.steps,
            )
        )
        save_accountant(context, accountant, job.state_file, job.ledger)
    if task.dp:
        epsilon = accountant.epsilon(delta)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "client-weight": 1,
        "steps": result.steps,
        "total-steps": accountant.total_steps,
        "sample-rate": result.sample_rate,
        "noise-multiplier": job.planned.noise_multiplier if task.dp else 0.0,
        "epsilon": epsilon if math.isfinite(epsilon) else -1.0,
        "delta": delta,
        "declined": 0,
    }
    if not task.dp:  # nothing is claimed about these without DP
        metrics.update(
            {
                NUM_EXAMPLES_KEY: result.num_examples,
                "train-loss": result.loss if math.isfinite(result.loss) else 0.0,
            }
        )
        if not math.isnan(result.accuracy):  # a regression task has none
            metrics["train-accuracy"] = result.accuracy
    cfg = record_of(job.msg.content, CONFIG, ConfigRecord)
    clip = cfg.get(KEY_CLIPPING_NORM) if cfg is not None else None
    if isinstance(clip, int | float):  # client-level DP, client-side clipping (client-fixed)
        state = clip_update(state, job.msg.content.array_records[ARRAYS], float(clip))
        metrics["clipping-norm"] = float(clip)
    arrays = ArrayRecord()  # filled item by item: ArrayRecord(dict) would re-encode each Array
    for key, value in state.items():
        arrays[key] = array(np.ascontiguousarray(value))
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics), INFO: job.info})
    return Message(content, reply_to=job.msg)


def clip_update(
    state: Mapping[str, np.ndarray], sent: ArrayRecord, clipping_norm: float
) -> dict[str, np.ndarray]:
    """The new parameters with the update (new - sent) clipped to ``clipping_norm`` in L2
    over all parameters together, as Flower's ``fixedclipping_mod`` does (its own helper)."""
    keys = list(state)
    new = [np.array(state[k], copy=True) for k in keys]
    old = [np.asarray(sent[k].numpy(), dtype=new[i].dtype) for i, k in enumerate(keys)]
    compute_clip_model_update(param1=new, param2=old, clipping_norm=clipping_norm)
    return dict(zip(keys, new, strict=True))
