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

from pollinate.client.task import ClientTask
from pollinate.client.training import TrainResult, TrainSettings, seed_for
from pollinate.client.training import evaluate as evaluate_model
from pollinate.client.training import train as train_model
from pollinate.data import ArrayDataset, load_local_data, load_partition
from pollinate.errors import PollinateError, PrivacyBudgetError
from pollinate.log import logger
from pollinate.models import build_model
from pollinate.privacy import ClientAccountant, MechanismStep

__all__ = ["ACCOUNTANT_KEY", "TrainJob", "app", "begin_train", "client_key", "finish_train"]

ACCOUNTANT_KEY = "pollinate.accountant"


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
    """A stable identity for this client: ``client-id``, else the partition, else the node id."""
    cfg = context.node_config
    if "client-id" in cfg:
        return str(cfg["client-id"])
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
    """Where this client's accountant is mirrored on disk.

    A device names its own ``state-dir`` in its node config; a simulated node (one with a
    ``partition-id``) uses the folder the server chose inside the run directory. A device
    never writes to a path the server sent.
    """
    node = context.node_config
    base = node.get("state-dir") or (task.client_state_dir if "partition-id" in node else "")
    if not base:
        return None
    return Path(str(base)) / f"{key}.accountant.json"


def _restore_accountant(context: Context, state_file: Path | None) -> ClientAccountant:
    """The longer of the in-memory and on-disk histories: epsilon never goes backwards."""
    from_state = ClientAccountant()
    if ACCOUNTANT_KEY in context.state.config_records:
        from_state = ClientAccountant.from_record(context.state.config_records[ACCOUNTANT_KEY])
    from_disk = ClientAccountant.load(state_file) if state_file is not None else ClientAccountant()
    return from_disk if from_disk.total_steps > from_state.total_steps else from_state


def _save_accountant(context: Context, acc: ClientAccountant, state_file: Path | None) -> None:
    context.state.config_records[ACCOUNTANT_KEY] = ConfigRecord(acc.to_record())  # type: ignore[arg-type]
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        acc.save(state_file)


def _model_from(msg: Message, task: ClientTask) -> torch.nn.Module:
    model = build_model(task.model, input_shape=task.input_shape, num_classes=task.num_classes)
    arrays = msg.content.array_records["arrays"]
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _budget(context: Context, task: ClientTask) -> float:
    """The stricter of the server's and the device owner's budget (0 means none)."""
    budgets = [task.epsilon_budget]
    if "epsilon-budget" in context.node_config:
        budgets.append(float(context.node_config["epsilon-budget"]))
    positive = [b for b in budgets if b > 0]
    return min(positive) if positive else 0.0


def _planned_step(task: ClientTask, n: int) -> MechanismStep:
    """The DP-SGD steps this round will take: Opacus' Poisson loader has ceil(n/B) batches."""
    batches = max(1, math.ceil(n / task.batch_size))
    return MechanismStep(
        noise_multiplier=task.noise_multiplier,
        sample_rate=1.0 / batches,
        steps=batches * task.local_epochs,
    )


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

    @property
    def seed(self) -> int:
        """This client's training seed for this round."""
        return seed_for(self.task.seed, self.task.server_round, _key_int(self.key))

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
    """Parse a train message and restore this client's accountant.

    Returns the job to run, or the reply that declines the round when the planned steps would
    take the client past its budget. ``mirror=False`` keeps the accountant in ``Context.state``
    only (the in-process simulation journals it itself); ``task``: the message's config,
    already parsed (the in-process simulation parses a round's shared config once).
    """
    if task is None:
        task = ClientTask.from_config(msg.content.config_records["config"])
    key = client_key(context)
    data = _local_data(context, task)
    delta = task.target_delta
    state_file = _state_file(context, task, key) if mirror else None
    accountant = _restore_accountant(context, state_file)
    info = ConfigRecord({"client": key})
    planned = _planned_step(task, len(data))
    if task.dp and len(data) > 0:
        try:
            accountant.check_budget(planned, delta=delta, budget=_budget(context, task))
        except PrivacyBudgetError as err:
            logger.info("client %s declines round %d: %s", key, task.server_round, err)
            info["declined"] = str(err)
            declined = MetricRecord(
                {"declined": 1, "epsilon": accountant.epsilon(delta), "delta": delta}
            )
            return Message(RecordDict({"metrics": declined, "info": info}), reply_to=msg)
    return TrainJob(msg, task, key, data, accountant, planned, state_file, info)


def finish_train(
    job: TrainJob,
    context: Context,
    result: TrainResult,
    state: Mapping[str, np.ndarray],
    *,
    array: Callable[[np.ndarray], Array] = Array,
) -> Message:
    """Record the steps taken in the accountant, save it, and build the reply.

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
        _save_accountant(context, accountant, job.state_file)
    if task.dp:
        epsilon = accountant.epsilon(delta)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": result.num_examples,
        "client-weight": 1,
        "train-loss": result.loss if math.isfinite(result.loss) else 0.0,
        "train-accuracy": result.accuracy,
        "steps": result.steps,
        "total-steps": accountant.total_steps,
        "sample-rate": result.sample_rate,
        "noise-multiplier": job.planned.noise_multiplier if task.dp else 0.0,
        "epsilon": epsilon if math.isfinite(epsilon) else -1.0,
        "delta": delta,
        "declined": 0,
    }
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
    result = train_model(model, job.data.x, job.data.y, seed=job.seed, **settings)
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
    """Evaluate the received global model on this node's local data."""
    torch.set_num_threads(1)
    task = ClientTask.from_config(msg.content.config_records["config"])
    data = _local_data(context, task)
    model = _model_from(msg, task)
    result = evaluate_model(model, data.x, data.y)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "eval-loss": result.loss if math.isfinite(result.loss) else 0.0,
            "eval-accuracy": result.accuracy,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


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
    from pollinate.client.bundles import BundleStore
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

    The weight is the strategy's (``num-examples``, or ``client-weight`` with client-level
    DP), capped at the protocol's ``max_weight``; a client that declines contributes zeros
    with weight 0, and its decline still reaches the server in the metrics.
    """
    from pollinate.server.secagg import SECAGG_MAX_WEIGHT_KEY, TASK_KEY, WEIGHT_KEY

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
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), weight, scalars)  # type: ignore[arg-type]
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
