"""This node as the ClientApp sees it: its stable identity, its local data and the split of
it, and where its privacy accountant is stored between rounds.

Each node keeps ONE privacy accountant for its whole life. It is restored at the start of
every message that spends privacy from the node's persistent ``Context.state`` (and, where a
state directory is configured, from disk, so a restarted process or a resumed simulation never
resets epsilon), extended by this round's steps, and saved back before replying.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message

from pollinate.clientapp.policy import DevicePolicy
from pollinate.clientapp.training import seed_for
from pollinate.data import ArrayDataset, load_local_data, load_partition
from pollinate.device.ledger import DeviceLedger
from pollinate.errors import PollinateError, PrivacyLedgerError
from pollinate.models import build_model
from pollinate.privacy import ClientAccountant
from pollinate.protocol import ARRAYS, ClientTask, NodeKey, partition_key, record_of

__all__ = [
    "ACCOUNTANT_KEY",
    "accountant_file",
    "client_key",
    "device_ledger",
    "key_int",
    "local_data",
    "model_from",
    "restore_accountant",
    "save_accountant",
    "split_local",
]

ACCOUNTANT_KEY = "pollinate.accountant"


def client_key(context: Context) -> str:
    """A stable identity for this client: ``client-id``; else, on a device, its device id
    (kept in its state dir, so re-registering under a new node id keeps it); else the
    partition, else the node id."""
    cfg = context.node_config
    if NodeKey.CLIENT_ID in cfg:
        return str(cfg[NodeKey.CLIENT_ID])
    if cfg.get(NodeKey.STATE_DIR):
        try:
            return "d-" + DeviceLedger(Path(str(cfg[NodeKey.STATE_DIR]))).identity()
        except PrivacyLedgerError:
            pass  # an unreadable identity: the train/evaluate handlers refuse with the reason
    if NodeKey.PARTITION_ID in cfg:
        return partition_key(int(cfg[NodeKey.PARTITION_ID]))
    return f"n{context.node_id}"


def local_data(context: Context, task: ClientTask) -> ArrayDataset:
    """This node's data: its own file on a device, its partition in a simulation."""
    node = context.node_config
    if NodeKey.DATA_PATH in node:
        return load_local_data(str(node[NodeKey.DATA_PATH]), task=task.task)
    if NodeKey.PARTITION_ID not in node:
        raise PollinateError(
            "this node has neither 'data-path' nor 'partition-id' in its node config; start the "
            "SuperNode with --node-config \"data-path='/path/to/data.npz'\""
        )
    return load_partition(
        task.dataset,
        int(node[NodeKey.PARTITION_ID]),
        int(node.get(NodeKey.NUM_PARTITIONS, task.num_partitions)),
        task.partitioner,
        seed=task.seed,
        alpha=task.dirichlet_alpha,
        shards_per_partition=task.shards_per_client,
        samples_per_partition=task.samples_per_client,
        test_fraction=task.test_fraction,
        task=task.task,
    )


def accountant_file(context: Context, task: ClientTask, key: str) -> Path | None:
    """Where a simulated node's accountant is mirrored on disk (the folder the server chose
    inside the run directory); a device keeps its own ledger (:class:`DeviceLedger`) and
    never writes to a path the server sent."""
    node = context.node_config
    if node.get(NodeKey.STATE_DIR) or NodeKey.PARTITION_ID not in node or not task.client_state_dir:
        return None
    return Path(task.client_state_dir) / f"{key}.accountant.json"


def device_ledger(context: Context) -> DeviceLedger | None:
    """A device's own ledger (its node config names a state dir), else None."""
    base = context.node_config.get(NodeKey.STATE_DIR)
    return DeviceLedger(Path(str(base))) if base else None


def restore_accountant(
    context: Context, state_file: Path | None, ledger: DeviceLedger | None, policy: DevicePolicy
) -> ClientAccountant:
    """The longer of the in-memory and on-disk histories: epsilon never goes backwards.

    A device's ledger must be there: a missing or corrupt one raises
    :class:`PrivacyLedgerError` unless the operator allowed a new one."""
    from_state = ClientAccountant()
    record = record_of(context.state, ACCOUNTANT_KEY, ConfigRecord)
    if record is not None:
        from_state = ClientAccountant.from_record(record)
    if ledger is not None:
        ledger.identity()  # a device seen for the first time starts with an empty ledger
        from_disk = ledger.load(allow_new=policy.new_ledger)
    elif state_file is not None:
        from_disk = ClientAccountant.load(state_file)
    else:
        from_disk = ClientAccountant()
    return from_disk if from_disk.total_steps > from_state.total_steps else from_state


def save_accountant(
    context: Context, acc: ClientAccountant, state_file: Path | None, ledger: DeviceLedger | None
) -> None:
    context.state[ACCOUNTANT_KEY] = ConfigRecord(acc.to_record())  # type: ignore[arg-type]
    if ledger is not None:
        ledger.save(acc)
    elif state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        acc.save(state_file)


def split_local(
    data: ArrayDataset, task: ClientTask, key: str
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, held-out) of this client's data: federated evaluation never sees a training
    sample. The split is fixed by the run seed and the client, the same every round."""
    n = len(data)
    held = math.floor(n * task.local_eval_fraction) if n >= 2 else 0
    if held == 0:
        return data, ArrayDataset(data.x[:0], data.y[:0])
    order = np.random.default_rng(seed_for(task.seed, key_int(key), 7)).permutation(n)
    test, train = order[:held], order[held:]
    return ArrayDataset(data.x[train], data.y[train]), ArrayDataset(data.x[test], data.y[test])


def model_from(msg: Message, task: ClientTask) -> torch.nn.Module:
    model = build_model(
        task.model, input_shape=task.input_shape, num_classes=task.num_outputs, fix=task.fix_model
    )
    arrays = msg.content.array_records[ARRAYS]
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def key_int(key: str) -> int:
    digits = "".join(ch for ch in key if ch.isdigit())
    if digits and len(digits) < 18:
        return int(digits)
    return int.from_bytes(key.encode()[:8].ljust(8, b"\0"), "little")
