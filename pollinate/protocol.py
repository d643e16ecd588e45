"""What the ServerApp, the ClientApp and the device daemon say to each other.

One module that all three import, so a key is spelled once:

* the typed task (:class:`ClientTask`): the ConfigRecord the server sends with each train and
  evaluate message;
* the record and metric keys of messages and replies (:data:`ACCOUNTING_KEYS`: all a DP reply
  says besides the model);
* the SecAgg+ keys the server's workflow and the client's adapter exchange;
* the node-config keys a device's daemon hands its ClientApp (its identity, data, and its own
  privacy policy, :data:`POLICY_KEYS`);
* the packed form of a model on the wire (:func:`pack_arrays`, :func:`unpack_arrays`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pollinate.errors import ConfigError
from pollinate.tasks import Task, TaskKind

__all__ = [
    "ACCOUNTING_KEYS",
    "ARRAYS",
    "BUNDLE_QUERY",
    "CONFIG",
    "INFO",
    "METRICS",
    "NUM_EXAMPLES_KEY",
    "PACKED_ARRAYS_KEY",
    "PACKED_ARRAYS_VERSION",
    "POLICY_KEYS",
    "SECAGG_MAX_WEIGHT_KEY",
    "SECAGG_TASK_KEY",
    "SECAGG_WEIGHT_KEY",
    "UNIFORM_WEIGHT_KEY",
    "ClientTask",
    "NodeKey",
    "pack_arrays",
    "partition_key",
    "reads_packed",
    "record_of",
    "records_of",
    "unpack_arrays",
]

# ------------------------------------------------------------------ records of a message
_Record = TypeVar("_Record", ArrayRecord, ConfigRecord, MetricRecord)
_Kind = TypeVar("_Kind")  # a record type, or a union of them


def record_of(content: RecordDict, key: str, kind: type[_Record]) -> _Record | None:
    """The record ``key`` of ``content`` if it is a ``kind``, else None.

    Flower's ``content.metric_records`` (and the array and config ones) build and check a new
    dict of every record of that type on each access; a round reads a dozen per reply, which
    cost the fast engine tens of milliseconds a round. This reads the one record."""
    record = content.get(key)
    return record if isinstance(record, kind) else None


def records_of(content: RecordDict, kind: type[_Kind]) -> list[tuple[str, _Kind]]:
    """``(key, record)`` of every ``kind`` record of ``content``, in order, read without
    Flower's per-access typed view (see :func:`record_of`). A reply has one ArrayRecord:
    validation and the strategies' checks hold callers to that before they take ``[0]``."""
    return [(k, r) for k, r in content.items() if isinstance(r, kind)]


ARRAYS = "arrays"  #: the model (ArrayRecord)
CONFIG = "config"  #: the task (ConfigRecord, parsed by ClientTask)
METRICS = "metrics"  #: a reply's numbers (MetricRecord)
INFO = "info"  #: a reply's text: client key, decline / refusal reasons (ConfigRecord)
BUNDLE_QUERY = "bundle"  #: the query message type that delivers a model bundle

# ------------------------------------------------------------------ the model on the wire
#: a node's identity reply says it reads packed models (``info`` record: the format version)
PACKED_ARRAYS_KEY = "packed-arrays"
#: the packed format this pollinate reads and writes. 1 (``True``, 2026-12-06) kept the flat
#: array as an Array; a node that says 1 is sent the named arrays.
PACKED_ARRAYS_VERSION = 2
_LAYOUT = "~layout"  #: suffix of the ConfigRecord that says how a packed ArrayRecord unpacks
_FLAT = "flat"  #: the flat values: bytes in the layout, or the one Array of a large model


def reads_packed(info: ConfigRecord | None) -> bool:
    """Whether a node's identity (its ``info`` record) says it reads this packed format."""
    version = info.get(PACKED_ARRAYS_KEY) if info is not None else None
    return type(version) is int and version == PACKED_ARRAYS_VERSION


def _inline_limit() -> int:
    """The largest model sent as bytes in its layout record: Flower's array chunk size
    (larger ones keep a flat Array, which Flower splits into chunks)."""
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    return FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE


def pack_arrays(content: RecordDict) -> RecordDict | None:
    """``content`` with its model (the :data:`ARRAYS` record) packed when it holds two or more
    float32 arrays: one ConfigRecord (``arrays~layout``) with the names, the shapes and the
    values as little-endian float32 bytes; None when nothing in ``content`` packs.

    Flower stores and sends every record and every array of a message as its own objects
    (an Array and its chunks), each one an authenticated request and a database row at the
    SuperLink and at every hop: a CNN's train message was 23 objects, packed it is 3. A model
    over Flower's chunk size keeps its values as one flat Array beside the layout. Lossless:
    the same float32 values, in the same order.
    """
    packed: dict[str, ArrayRecord | ConfigRecord] = {}
    inlined: set[str] = set()
    for key, record in content.items():
        if key != ARRAYS or not isinstance(record, ArrayRecord) or len(record) < 2:
            continue
        arrays = list(record.items())
        if any(a.stype != "numpy.ndarray" or a.dtype != "float32" for _, a in arrays):
            continue
        values = [a.numpy() for _, a in arrays]
        flat = np.concatenate([v.reshape(-1) for v in values]).astype("<f4", copy=False)
        layout: dict[str, list[str] | list[int] | bytes] = {
            "names": [name for name, _ in arrays],
            "ranks": [v.ndim for v in values],
            "dims": [d for v in values for d in v.shape],
        }
        if flat.nbytes <= _inline_limit():
            layout[_FLAT] = flat.tobytes()
            inlined.add(key)
        else:
            packed[key] = ArrayRecord({_FLAT: Array(flat)})
        packed[key + _LAYOUT] = ConfigRecord(layout)  # type: ignore[arg-type]
    if not packed:
        return None
    kept = {k: r for k, r in content.items() if k not in packed and k not in inlined}
    return RecordDict({**kept, **packed})


def _flat_values(content: RecordDict, name: str, layout: ConfigRecord) -> np.ndarray:
    """The flat float32 values of packed record ``name``: inline bytes or its one Array."""
    inline, record = layout.get(_FLAT), content.get(name)
    try:
        if inline is not None:
            if not isinstance(inline, bytes) or len(inline) % 4 or record is not None:
                raise ValueError("its values are not float32 bytes")
            return np.frombuffer(inline, dtype="<f4")
        if not isinstance(record, ArrayRecord) or list(record.keys()) != [_FLAT]:
            raise ValueError("no values")
        flat: np.ndarray = record[_FLAT].numpy().reshape(-1)
    except Exception as err:  # bytes that are not an array
        raise ConfigError(f"message record {name!r}: cannot be decoded: {err}") from None
    return flat


def unpack_arrays(content: RecordDict) -> RecordDict | None:
    """``content`` with each packed model (:func:`pack_arrays`) back as named arrays; None
    when nothing in ``content`` is packed.

    Raises:
        ConfigError: A layout that does not fit its values (a corrupt or foreign message).
    """
    unpacked: dict[str, ArrayRecord] = {}
    for key, layout in content.items():
        if not key.endswith(_LAYOUT) or not isinstance(layout, ConfigRecord):
            continue
        name = key[: -len(_LAYOUT)]
        names, ranks, dims = layout.get("names"), layout.get("ranks"), layout.get("dims")
        if (
            not isinstance(names, list)
            or not isinstance(ranks, list)
            or not isinstance(dims, list)
            or len(names) != len(ranks)
            or not all(type(n) is int and n >= 0 for n in (*ranks, *dims))
            or sum(int(r) for r in ranks) != len(dims)
        ):
            raise ConfigError(f"message record {name!r}: its packed layout does not fit it")
        flat = _flat_values(content, name, layout)
        arrays: dict[str, Array] = {}
        offset, at = 0, 0
        for label, rank in zip(names, ranks, strict=True):
            shape = tuple(int(d) for d in dims[at : at + int(rank)])  # type: ignore[call-overload]
            at += int(rank)  # type: ignore[call-overload]
            size = int(np.prod(shape, dtype=np.int64))
            if offset + size > flat.size:
                raise ConfigError(f"message record {name!r}: its packed layout does not fit it")
            arrays[str(label)] = Array(flat[offset : offset + size].reshape(shape))
            offset += size
        if offset != flat.size:
            raise ConfigError(f"message record {name!r}: its packed layout does not fit it")
        unpacked[name] = ArrayRecord(arrays)
    if not unpacked:
        return None
    out: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {}
    for key, record in content.items():
        name = key[: -len(_LAYOUT)] if key.endswith(_LAYOUT) else key
        out[name] = unpacked.get(name, record)
    return RecordDict(out)


# ------------------------------------------------------------------ reply metrics
NUM_EXAMPLES_KEY = "num-examples"  #: exact local sample count: sent only without DP
UNIFORM_WEIGHT_KEY = "client-weight"  #: weight 1 per client (under any DP)

#: what a DP reply says besides the model: the mechanism, nothing exact about the data
ACCOUNTING_KEYS = (
    "client-weight", "steps", "total-steps", "sample-rate", "noise-multiplier", "epsilon",
    "delta", "declined", "refused", "clipping-norm",
)  # fmt: skip

# ------------------------------------------------------------------ SecAgg+ task config
SECAGG_WEIGHT_KEY = "secagg-weight-key"  #: which reply metric weighs the masked update
SECAGG_MAX_WEIGHT_KEY = "secagg-max-weight"  #: the cap the protocol scales weights by
SECAGG_TASK_KEY = "pollinate-task"  #: the task config, as JSON inside the legacy FitIns


# ------------------------------------------------------------------ node config of a device
class NodeKey:
    """Node-config keys: what a SuperNode (a device's daemon, or the simulation) tells its
    ClientApp about the node."""

    CLIENT_ID = "client-id"
    STATE_DIR = "state-dir"
    DATA_PATH = "data-path"
    PARTITION_ID = "partition-id"
    NUM_PARTITIONS = "num-partitions"
    BUNDLE_PUBLIC_KEY = "bundle-public-key"
    PRIVACY_DP = "privacy-dp"
    PRIVACY_MIN_NOISE = "privacy-min-noise"
    PRIVACY_MAX_CLIP = "privacy-max-clip"
    PRIVACY_MAX_EPOCHS = "privacy-max-epochs"
    EPSILON_BUDGET = "epsilon-budget"
    NEW_LEDGER = "new-ledger"
    ALLOWED_IMPORTS = "allowed-imports"
    EMULATE_LATENCY = "emulate-latency"  #: a latency spec: answer as late as it says


def partition_key(partition: int) -> str:
    """The client key of a simulated node that holds partition ``partition`` (and no
    ``client-id``): what its ClientApp answers, and what the fast engine's directory knows
    without asking."""
    return f"p{partition:06d}"


#: node-config keys of the device's own privacy policy (``pollinate edge run`` sets them)
POLICY_KEYS = (
    NodeKey.PRIVACY_DP,
    NodeKey.PRIVACY_MIN_NOISE,
    NodeKey.PRIVACY_MAX_CLIP,
    NodeKey.PRIVACY_MAX_EPOCHS,
    NodeKey.EPSILON_BUDGET,
    NodeKey.NEW_LEDGER,
    NodeKey.ALLOWED_IMPORTS,
)


def _num(cfg: Mapping[str, object], key: str, default: float | None = None) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"train config: {key!r} must be a number, got {value!r}")
    return float(value)


def _int(cfg: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = _num(cfg, key, default)
    if not value.is_integer():
        raise ConfigError(f"train config: {key!r} must be an integer, got {value!r}")
    return int(value)


def _str(cfg: Mapping[str, object], key: str, default: str | None = None) -> str:
    value = cfg.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"train config: {key!r} must be text, got {value!r}")
    return value


@dataclass(frozen=True)
class ClientTask:
    """What the server asks a client to do this round."""

    server_round: int
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    test_fraction: float
    partitioner: str
    num_partitions: int
    dirichlet_alpha: float
    shards_per_client: int
    samples_per_client: int
    seed: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    dp: bool
    noise_multiplier: float
    max_grad_norm: float
    target_delta: float
    epsilon_budget: float
    proximal_mu: float
    client_state_dir: str
    reproducible_noise: bool = False
    local_eval_fraction: float = 0.0
    eval_noise_multiplier: float = 5.0
    fix_model: bool = False
    task: TaskKind = TaskKind.CLASSIFICATION
    loss: str = ""
    physical_batch_size: int = 0

    @property
    def learning_task(self) -> Task:
        """What the model learns: its output width, loss and targets."""
        return Task(kind=self.task, num_classes=self.num_classes, loss=self.loss)

    @property
    def num_outputs(self) -> int:
        """The model's output width."""
        return self.learning_task.num_outputs

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> ClientTask:
        """Parse and check the server's ConfigRecord."""
        shape = cfg.get("input-shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ConfigError(f"train config: 'input-shape' must be a list of ints, got {shape!r}")
        return cls(
            server_round=_int(cfg, "server-round", 0),
            model=_str(cfg, "model"),
            input_shape=tuple(int(d) for d in shape),
            num_classes=_int(cfg, "num-classes"),
            dataset=_str(cfg, "dataset"),
            test_fraction=_num(cfg, "test-fraction"),
            partitioner=_str(cfg, "partitioner"),
            num_partitions=_int(cfg, "num-partitions"),
            dirichlet_alpha=_num(cfg, "dirichlet-alpha"),
            shards_per_client=_int(cfg, "shards-per-client"),
            samples_per_client=_int(cfg, "samples-per-client", 0),
            seed=_int(cfg, "seed"),
            local_epochs=_int(cfg, "local-epochs"),
            batch_size=_int(cfg, "batch-size"),
            learning_rate=_num(cfg, "learning-rate"),
            momentum=_num(cfg, "momentum", 0.0),
            dp=_str(cfg, "dp") == "sample",
            noise_multiplier=_num(cfg, "noise-multiplier"),
            max_grad_norm=_num(cfg, "max-grad-norm"),
            target_delta=_num(cfg, "target-delta"),
            epsilon_budget=_num(cfg, "epsilon-budget", 0.0),
            proximal_mu=_num(cfg, "proximal-mu", 0.0),
            client_state_dir=_str(cfg, "client-state-dir", ""),
            reproducible_noise=bool(cfg.get("reproducible-noise", False)),
            local_eval_fraction=_num(cfg, "local-eval-fraction", 0.0),
            eval_noise_multiplier=_num(cfg, "eval-noise-multiplier", 5.0),
            fix_model=bool(cfg.get("fix-model", False)),
            task=_task_kind(cfg),
            loss=_str(cfg, "loss", ""),
            physical_batch_size=_int(cfg, "physical-batch-size", 0),
        )


def _task_kind(cfg: Mapping[str, object]) -> TaskKind:
    value = _str(cfg, "task", TaskKind.CLASSIFICATION.value)
    try:
        kind = TaskKind(value)
    except ValueError:
        kind = TaskKind.AUTO
    if kind == TaskKind.AUTO:
        raise ConfigError(f"train config: 'task' must be a resolved task, got {value!r}")
    return kind
