"""The pollinate ClientApp (Flower Message API): train, evaluate, and identify.

Each node keeps ONE privacy accountant for its whole life. It is restored at the start of
every ``train`` message from the node's persistent ``Context.state`` (and, where a state
directory is configured, from disk, so a restarted process or a resumed simulation never
resets epsilon), extended by this round's DP-SGD steps, and saved back before replying.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    MessageType,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

from pollinate.clientapp.policy import IDENTITY_FILE, DeviceLedger, DevicePolicy
from pollinate.protocol import ClientTask
from pollinate.clientapp.training import EvalResult, TrainResult, TrainSettings, dp_plan, seed_for
from pollinate.clientapp.training import evaluate as evaluate_model
from pollinate.clientapp.training import train as train_model
from pollinate.data import ArrayDataset, load_local_data, load_partition
from pollinate.errors import PollinateError, PrivacyBudgetError, PrivacyLedgerError
from pollinate.log import logger
from pollinate.models import build_model
from pollinate.privacy import ClientAccountant, MechanismStep
from pollinate.privacy.noise import NoiseSource, gaussian

__all__ = ["ACCOUNTANT_KEY", "TrainJob", "app", "begin_train", "client_key", "finish_train"]

ACCOUNTANT_KEY = "pollinate.accountant"
REFUSALS_KEY = "pollinate.refusals"


def _secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the train messages of a SecAgg+ round (they carry its
    stage config); every other message goes straight to the app."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, context, _train_for_secagg)
    return call_next(msg, context)


app = ClientApp(mods=[_secure_aggregation])


def client_key(context: Context) -> str:
    """A stable identity for this client: ``client-id``; else, on a device, its device id
    (kept in its state dir, so re-registering under a new node id keeps it); else the
    partition, else the node id."""
    cfg = context.node_config
    if "client-id" in cfg:
        return str(cfg["client-id"])
    if cfg.get("state-dir"):
        try:
            return "d-" + DeviceLedger(Path(str(cfg["state-dir"]))).identity(
                allow_new=DevicePolicy.from_node_config(cfg).new_ledger
            )
        except PrivacyLedgerError:
            pass  # the train/evaluate handlers refuse with the reason; keep the identity
        try:
            text = (Path(str(cfg["state-dir"])) / IDENTITY_FILE).read_text(encoding="utf-8")
            return "d-" + text.strip()
        except OSError:
            pass
    if "partition-id" in cfg:
        return f"p{int(cfg['partition-id']):06d}"
    return f"n{context.node_id}"


def _local_data(context: Context, task: ClientTask) -> ArrayDataset:
    node = context.node_config
    if "data-path" in node:
        return load_local_data(str(node["data-path"]))
    if "partition-id" not in node:
        raise PollinateError(
            "this node has neither 'data-path' nor 'partition-id' in its node config; start the "
            "SuperNode with --node-config \"data-path='/path/to/data.npz'\""
        )
    return load_partition(
        task.dataset,
        int(node["partition-id"]),
        int(node.get("num-partitions", task.num_partitions)),
        task.partitioner,
        seed=task.seed,
        alpha=task.dirichlet_alpha,
        shards_per_partition=task.shards_per_client,
        samples_per_partition=task.samples_per_client,
        test_fraction=task.test_fraction,
    )


def _state_file(context: Context, task: ClientTask, key: str) -> Path | None:
    """Where a simulated node's accountant is mirrored on disk (the folder the server chose
    inside the run directory); a device keeps its own ledger (:class:`DeviceLedger`) and
    never writes to a path the server sent."""
    node = context.node_config
    if node.get("state-dir") or "partition-id" not in node or not task.client_state_dir:
        return None
    return Path(task.client_state_dir) / f"{key}.accountant.json"


def _device_ledger(context: Context) -> DeviceLedger | None:
    base = context.node_config.get("state-dir")
    return DeviceLedger(Path(str(base))) if base else None


def _restore_accountant(
    context: Context, state_file: Path | None, ledger: DeviceLedger | None, policy: DevicePolicy
) -> ClientAccountant:
    """The longer of the in-memory and on-disk histories: epsilon never goes backwards.

    A device's ledger must be there: a missing or corrupt one raises
    :class:`PrivacyLedgerError` unless the operator allowed a new one."""
    from_state = ClientAccountant()
    if ACCOUNTANT_KEY in context.state.config_records:
        from_state = ClientAccountant.from_record(context.state.config_records[ACCOUNTANT_KEY])
    if ledger is not None:
        ledger.identity(allow_new=policy.new_ledger)
        from_disk = ledger.load(allow_new=policy.new_ledger)
    elif state_file is not None:
        from_disk = ClientAccountant.load(state_file)
    else:
        from_disk = ClientAccountant()
    return from_disk if from_disk.total_steps > from_state.total_steps else from_state


def _save_accountant(
    context: Context, acc: ClientAccountant, state_file: Path | None, ledger: DeviceLedger | None
) -> None:
    context.state.config_records[ACCOUNTANT_KEY] = ConfigRecord(acc.to_record())  # type: ignore[arg-type]
    if ledger is not None:
        ledger.save(acc)
    elif state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        acc.save(state_file)


def _split(data: ArrayDataset, task: ClientTask, key: str) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, held-out) of this client's data: federated evaluation never sees a training
    sample. The split is fixed by the run seed and the client, the same every round."""
    n = len(data)
    held = math.floor(n * task.local_eval_fraction) if n >= 2 else 0
    if held == 0:
        return data, ArrayDataset(data.x[:0], data.y[:0])
    order = np.random.default_rng(seed_for(task.seed, _key_int(key), 7)).permutation(n)
    test, train = order[:held], order[held:]
    return ArrayDataset(data.x[train], data.y[train]), ArrayDataset(data.x[test], data.y[test])


def _model_from(msg: Message, task: ClientTask) -> torch.nn.Module:
    model = build_model(task.model, input_shape=task.input_shape, num_classes=task.num_classes)
    arrays = msg.content.array_records["arrays"]
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _planned_step(task: ClientTask, n: int) -> MechanismStep:
    """The DP-SGD steps this round will take, exactly as Opacus' Poisson loader runs them."""
    rate, per_epoch = dp_plan(n, task.batch_size)
    return MechanismStep(
        noise_multiplier=task.noise_multiplier,
        sample_rate=rate,
        steps=per_epoch * task.local_epochs,
    )


def _refuse(
    msg: Message, context: Context, key: str, reason: str, *, epsilon: float, delta: float
) -> Message:
    """The reply to a task the device will not run: counted here and reported to the server."""
    task_cfg = msg.content.config_records.get("config")
    rnd = int(task_cfg.get("server-round", 0)) if task_cfg is not None else 0  # type: ignore[arg-type]
    ledger = _device_ledger(context)
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
    return Message(RecordDict({"metrics": metrics, "info": info}), reply_to=msg)


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
        return seed_for(self.task.seed, self.task.server_round, _key_int(self.key))

    @property
    def noise(self) -> NoiseSource:
        """Where this round's DP randomness comes from: secret, unless the (test-only)
        reproducible switch is on, which a device refuses."""
        if self.task.reproducible_noise:
            return NoiseSource.for_tests(self.task.seed, self.task.server_round, _key_int(self.key))
        return NoiseSource.secure()

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
        task = ClientTask.from_config(msg.content.config_records["config"])
    key = client_key(context)
    delta = task.target_delta
    policy = DevicePolicy.from_node_config(context.node_config)
    refusal = policy.refusal(task)
    if refusal is not None:
        return _refuse(msg, context, key, refusal, epsilon=-1.0, delta=delta)
    data, _ = _split(_local_data(context, task), task, key)
    state_file = _state_file(context, task, key) if mirror else None
    ledger = _device_ledger(context) if mirror else None
    try:
        accountant = _restore_accountant(context, state_file, ledger, policy)
    except PrivacyLedgerError as err:
        return _refuse(msg, context, key, f"refused: {err}", epsilon=-1.0, delta=delta)
    info = ConfigRecord({"client": key})
    planned = _planned_step(task, len(data))
    if task.dp and len(data) > 0:
        try:
            accountant.check_budget(planned, delta=delta, budget=policy.budget_for(task))
        except PrivacyBudgetError as err:
            logger.info("client %s declines round %d: %s", key, task.server_round, err)
            info["declined"] = str(err)
            declined = MetricRecord(
                {"declined": 1, "epsilon": accountant.epsilon(delta), "delta": delta}
            )
            return Message(RecordDict({"metrics": declined, "info": info}), reply_to=msg)
    return TrainJob(msg, task, key, data, accountant, planned, state_file, info, ledger)


#: what a DP reply says besides the model: the mechanism, nothing exact about the data
ACCOUNTING_KEYS = (
    "client-weight", "steps", "total-steps", "sample-rate", "noise-multiplier", "epsilon",
    "delta", "declined", "refused", "clipping-norm",
)  # fmt: skip


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
        _save_accountant(context, accountant, job.state_file, job.ledger)
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
                "num-examples": result.num_examples,
                "train-loss": result.loss if math.isfinite(result.loss) else 0.0,
                "train-accuracy": result.accuracy,
            }
        )
    cfg = job.msg.content.config_records.get("config")
    clip = cfg.get(KEY_CLIPPING_NORM) if cfg is not None else None
    if isinstance(clip, int | float):  # client-level DP, client-side clipping (client-fixed)
        state = _clip_update(state, job.msg.content.array_records["arrays"], float(clip))
        metrics["clipping-norm"] = float(clip)
    arrays = ArrayRecord()  # filled item by item: ArrayRecord(dict) would re-encode each Array
    for key, value in state.items():
        arrays[key] = array(np.ascontiguousarray(value))
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "info": job.info})
    return Message(content, reply_to=job.msg)


def _clip_update(
    state: Mapping[str, np.ndarray], sent: ArrayRecord, clipping_norm: float
) -> dict[str, np.ndarray]:
    """The new parameters with the update (new - sent) clipped to ``clipping_norm`` in L2
    over all parameters together, as Flower's ``fixedclipping_mod`` does (its own helper)."""
    keys = list(state)
    new = [np.array(state[k], copy=True) for k in keys]
    old = [np.asarray(sent[k].numpy(), dtype=new[i].dtype) for i, k in enumerate(keys)]
    compute_clip_model_update(param1=new, param2=old, clipping_norm=clipping_norm)
    return dict(zip(keys, new, strict=True))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's data; reply with the update."""
    torch.set_num_threads(1)
    job = begin_train(msg, context)
    if isinstance(job, Message):
        _note_round(context, msg, declined=True)
        return job
    model = _model_from(msg, job.task)
    settings = dataclasses.asdict(job.settings)
    result = train_model(model, job.data.x, job.data.y, seed=job.seed, noise=job.noise, **settings)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    reply = finish_train(job, context, result, state)
    _note_round(context, msg, declined=False)
    return reply


def _note_round(context: Context, msg: Message, *, declined: bool) -> None:
    """On a device (``state-dir``), remember the last round asked of it for `edge status`."""
    base = context.node_config.get("state-dir")
    if not base:
        return
    import datetime as dt
    import json

    from pollinate._atomic import atomic_write_text

    cfg = msg.content.config_records.get("config")
    note = {
        "run_id": context.run_id,
        "server_round": int(cfg.get("server-round", 0)) if cfg is not None else 0,  # type: ignore[arg-type]
        "declined": declined,
        "at": dt.datetime.now(dt.UTC).isoformat(),
    }
    atomic_write_text(Path(str(base)) / "last-round.json", json.dumps(note) + "\n")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's held-out local split.

    Never on the training samples. Under DP the reply carries only the number of correct
    predictions and of samples, each with Gaussian noise (std ``eval-noise-multiplier *
    sqrt(2)``: together they change by at most sqrt(2) when one example is added or removed),
    and that release is charged to the device's accountant like a training round.
    """
    torch.set_num_threads(1)
    task = ClientTask.from_config(msg.content.config_records["config"])
    key = client_key(context)
    delta = task.target_delta
    policy = DevicePolicy.from_node_config(context.node_config)
    refusal = policy.refusal(task, evaluate=True)
    if refusal is not None:
        return _refuse(msg, context, key, refusal, epsilon=-1.0, delta=delta)
    _, held = _split(_local_data(context, task), task, key)
    if len(held) == 0:
        info = ConfigRecord({"client": key, "declined": "no held-out local split to evaluate on"})
        return Message(
            RecordDict({"metrics": MetricRecord({"declined": 1}), "info": info}), reply_to=msg
        )
    result = evaluate_model(_model_from(msg, task), held.x, held.y)
    if not task.dp:
        metrics = MetricRecord(
            {
                "num-examples": result.num_examples,
                "eval-loss": result.loss if math.isfinite(result.loss) else 0.0,
                "eval-accuracy": result.accuracy,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)
    return _private_evaluation(msg, context, task, key, policy, result)


def _private_evaluation(
    msg: Message,
    context: Context,
    task: ClientTask,
    key: str,
    policy: DevicePolicy,
    result: EvalResult,
) -> Message:
    """Noised counts of the evaluation, charged to this client's accountant."""
    delta = task.target_delta
    state_file = _state_file(context, task, key)
    ledger = _device_ledger(context)
    try:
        accountant = _restore_accountant(context, state_file, ledger, policy)
    except PrivacyLedgerError as err:
        return _refuse(msg, context, key, f"refused: {err}", epsilon=-1.0, delta=delta)
    step = MechanismStep(noise_multiplier=task.eval_noise_multiplier, sample_rate=1.0, steps=1)
    try:
        accountant.check_budget(step, delta=delta, budget=policy.budget_for(task))
    except PrivacyBudgetError as err:
        info = ConfigRecord({"client": key, "declined": str(err)})
        declined = MetricRecord({"declined": 1, "epsilon": accountant.epsilon(delta)})
        return Message(RecordDict({"metrics": declined, "info": info}), reply_to=msg)
    accountant.record(step)
    _save_accountant(context, accountant, state_file, ledger)
    counts = torch.tensor(
        [round(result.accuracy * result.num_examples), result.num_examples], dtype=torch.float64
    )
    std = task.eval_noise_multiplier * math.sqrt(2.0)
    source = (
        NoiseSource.for_tests(task.seed, task.server_round, _key_int(key), 99)
        if (task.reproducible_noise)
        else NoiseSource.secure()
    )
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
    content = RecordDict({"metrics": metrics, "info": ConfigRecord({"client": key})})
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say who this node is (its stable client key), so the server can sample by identity."""
    info = ConfigRecord({"client": client_key(context)})
    return Message(RecordDict({"info": info}), reply_to=msg)


def _key_int(key: str) -> int:
    digits = "".join(ch for ch in key if ch.isdigit())
    if digits and len(digits) < 18:
        return int(digits)
    return int.from_bytes(key.encode()[:8].ljust(8, b"\0"), "little")


@app.query("bundle")
def install_bundle(msg: Message, context: Context) -> Message:
    """Install the model bundle the server delivers (verify, then switch atomically).

    The node needs a ``state-dir`` in its node config (the daemon sets it); with
    ``bundle-public-key`` (the exporter's ed25519 public key) the manifest's signature must
    verify too. The reply says ``installed`` with the bundle's name, or ``refused`` with the
    reason; a refused bundle changes nothing on the device.
    """
    from pollinate.device.bundles import BundleStore
    from pollinate.edge_runtime import BundleError

    node = context.node_config
    info: dict[str, str] = {"client": client_key(context)}
    try:
        if not node.get("state-dir"):
            raise BundleError("this node has no state-dir in its node config to install into")
        record = msg.content.config_records["bundle"]
        archive, digest = record["archive"], record["sha256"]
        if not isinstance(archive, bytes) or not isinstance(digest, str):
            raise BundleError("the bundle message lacks its archive bytes or sha256")
        key = node.get("bundle-public-key")
        installed = BundleStore(Path(str(node["state-dir"]))).install(
            archive, sha256=digest, public_key=Path(str(key)) if key else None
        )
    except (BundleError, KeyError) as err:
        reason = str(err) if isinstance(err, BundleError) else f"missing {err} in the message"
        logger.warning("refused a delivered bundle: %s", reason)
        info.update(status="refused", reason=reason)
    else:
        logger.info("installed bundle %s", installed.name)
        info.update(status="installed", bundle=installed.name)
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)  # type: ignore[arg-type]


def _train_for_secagg(msg: Message, context: Context) -> Message:
    """Adapt a SecAgg+ train message (legacy ``FitIns`` records) to :func:`train` and its
    reply back to a legacy ``FitRes``, which ``secaggplus_mod`` masks before it leaves.

    The weight is the strategy's (``num-examples``, or ``client-weight`` under any DP), capped
    at the protocol's ``max_weight``; only the accounting (epsilon, steps, rate, noise) travels
    in clear beside the masked update, never a metric such as loss or accuracy; a client that
    declines contributes zeros with weight 0, and its decline still reaches the server in the
    metrics.
    """
    from pollinate.serverapp.secagg import SECAGG_MAX_WEIGHT_KEY, TASK_KEY, WEIGHT_KEY

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = json.loads(str(fitins.config[TASK_KEY]))
    weight_key = str(fitins.config.get(WEIGHT_KEY, "num-examples"))
    max_weight = float(fitins.config.get(SECAGG_MAX_WEIGHT_KEY, 1000.0))
    task = ClientTask.from_config(ConfigRecord(config))
    model = build_model(task.model, input_shape=task.input_shape, num_classes=task.num_classes)
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
    msg.content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    reply = train(msg, context)
    if reply.has_error():
        return reply
    metrics = reply.content.metric_records["metrics"]
    trained = reply.content.array_records.get("arrays")
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
