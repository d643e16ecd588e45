"""The pollinate ClientApp (Flower Message API): train, evaluate, identify, install bundles.

The handlers are thin: :mod:`~pollinate.clientapp.jobs` runs a train request from message to
reply, :mod:`~pollinate.clientapp.evaluation` the federated evaluation,
:mod:`~pollinate.clientapp.local` knows this node (identity, data, accountant storage) and
:mod:`~pollinate.clientapp.policy` the device's own privacy policy, checked first.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from pollinate._atomic import atomic_write_text
from pollinate.clientapp.evaluation import evaluate_message
from pollinate.clientapp.jobs import begin_train, finish_train
from pollinate.clientapp.latency import answer_late
from pollinate.clientapp.local import client_key, model_from
from pollinate.clientapp.secagg import train_for_secagg
from pollinate.clientapp.training import train as train_model
from pollinate.device.bundles import BundleStore
from pollinate.edge_runtime import BundleError
from pollinate.log import logger
from pollinate.protocol import (
    BUNDLE_QUERY,
    CONFIG,
    INFO,
    PACKED_ARRAYS_KEY,
    PACKED_ARRAYS_VERSION,
    NodeKey,
    pack_arrays,
    unpack_arrays,
)

__all__ = ["app"]


def _secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the train messages of a SecAgg+ round (they carry its
    stage config); every other message goes straight to the app."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, context, _train_for_secagg)
    return call_next(msg, context)


def _packed_arrays(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A model that came packed (flat values, :func:`pollinate.protocol.pack_arrays`) is
    unpacked before the app sees it, and the reply's model goes back packed."""
    content = unpack_arrays(msg.content) if msg.has_content() else None
    if content is None:
        return call_next(msg, context)
    msg.content = content
    reply = call_next(msg, context)
    packed = pack_arrays(reply.content) if reply.has_content() else None
    if packed is not None:
        reply.content = packed
    return reply


app = ClientApp(mods=[_packed_arrays, _secure_aggregation])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's data; reply with the update."""
    received = time.monotonic()
    torch.set_num_threads(1)
    job = begin_train(msg, context)
    if isinstance(job, Message):
        note_round(context, msg, declined=True)
        answer_late(context, received)
        return job
    model = model_from(msg, job.task)
    settings = job.settings.kwargs()
    result = train_model(model, job.data.x, job.data.y, seed=job.seed, noise=job.noise, **settings)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    reply = finish_train(job, context, result, state)
    note_round(context, msg, declined=False)
    answer_late(context, received)  # a straggler test's emulated device (edge run)
    return reply


def note_round(context: Context, msg: Message, *, declined: bool) -> None:
    """On a device (``state-dir``), remember the last round asked of it for `edge status`."""
    base = context.node_config.get(NodeKey.STATE_DIR)
    if not base:
        return
    cfg = msg.content.config_records.get(CONFIG)
    note = {
        "run_id": context.run_id,
        "server_round": int(cfg.get("server-round", 0)) if cfg is not None else 0,  # type: ignore[arg-type]
        "declined": declined,
        "at": dt.datetime.now(dt.UTC).isoformat(),
    }
    atomic_write_text(Path(str(base)) / "last-round.json", json.dumps(note) + "\n")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's held-out local split (see
    :mod:`pollinate.clientapp.evaluation`: under DP, noised counts, accounted)."""
    torch.set_num_threads(1)
    return evaluate_message(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say who this node is (its stable client key), so the server can sample by identity."""
    info = ConfigRecord({"client": client_key(context), PACKED_ARRAYS_KEY: PACKED_ARRAYS_VERSION})
    return Message(RecordDict({INFO: info}), reply_to=msg)


@app.query(BUNDLE_QUERY)
def install_bundle(msg: Message, context: Context) -> Message:
    """Install the model bundle the server delivers (verify, then switch atomically).

    The node needs a ``state-dir`` in its node config (the daemon sets it); with
    ``bundle-public-key`` (the exporter's ed25519 public key) the manifest's signature must
    verify too. The reply says ``installed`` with the bundle's name, or ``refused`` with the
    reason; a refused bundle changes nothing on the device.
    """
    node = context.node_config
    info: dict[str, str] = {"client": client_key(context)}
    try:
        if not node.get(NodeKey.STATE_DIR):
            raise BundleError("this node has no state-dir in its node config to install into")
        record = msg.content.config_records["bundle"]
        archive, digest = record["archive"], record["sha256"]
        if not isinstance(archive, bytes) or not isinstance(digest, str):
            raise BundleError("the bundle message lacks its archive bytes or sha256")
        key = node.get(NodeKey.BUNDLE_PUBLIC_KEY)
        installed = BundleStore(Path(str(node[NodeKey.STATE_DIR]))).install(
            archive, sha256=digest, public_key=Path(str(key)) if key else None
        )
    except (BundleError, KeyError) as err:
        reason = str(err) if isinstance(err, BundleError) else f"missing {err} in the message"
        logger.warning("refused a delivered bundle: %s", reason)
        info.update(status="refused", reason=reason)
    else:
        logger.info("installed bundle %s", installed.name)
        info.update(status="installed", bundle=installed.name)
    return Message(RecordDict({INFO: ConfigRecord(info)}), reply_to=msg)  # type: ignore[arg-type]


def _train_for_secagg(msg: Message, context: Context) -> Message:
    """A SecAgg+ round's train message, through :func:`train` (see
    :mod:`pollinate.clientapp.secagg`)."""
    return train_for_secagg(msg, context, train)
