"""The fast simulation engine: a Flower ``Grid`` whose nodes live in this process.

``run_federation`` (sampling, strategies, DP wrappers, validation, ledger, checkpoints) talks
to this grid exactly as it talks to Flower's simulation engine or a real SuperLink. What
changes is delivery: no SuperLink state, no polling, no Ray actors, no serialization per
client. Messages are handled here:

- ``train``: every message of a round goes through the ClientApp's own
  :func:`~pollinate.clientapp.jobs.begin_train` (task parsing, data, accountant restore, budget
  check, declines) and :func:`~pollinate.clientapp.jobs.finish_train` (accounting, reply); the
  local training in between runs for the whole cohort at once
  (:func:`~pollinate.simulation.cohort.train_cohort`).
- anything else (``query``, ``evaluate``): the pollinate ClientApp itself, called in process.

Each node keeps a Flower ``Context`` for the whole run, so its accountant lives in
``Context.state`` as it does under Flower's engine. After every batch of train replies the
accountants that changed are appended to ``clients/accountants.jsonl`` with one fsync,
before the server sees the replies: a resumed run restores every client's full history
(from that journal, or from the per-client files the Ray engine writes, whichever is longer).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from pollinate._atomic import append_lines, atomic_write_text
from pollinate.clientapp.jobs import TrainJob, begin_train
from pollinate.clientapp.local import ACCOUNTANT_KEY, client_key
from pollinate.log import logger
from pollinate.privacy import ClientAccountant
from pollinate.protocol import ClientTask, record_of
from pollinate.simulation.cohort_jobs import CohortTrainer, error_reply
from pollinate.simulation.latency import LatencyModel, SimulatedNetwork
from pollinate.simulation.local_array import LocalArray

__all__ = ["JOURNAL_NAME", "LocalGrid"]

JOURNAL_NAME = "accountants.jsonl"
_NODE_BASE = 1 << 32  # node ids: partition id + this (never the SuperLink's id)


class LocalGrid(Grid):
    """``num_nodes`` virtual SuperNodes (partitions ``0 .. num_nodes - 1``) in this process.

    Args:
        num_nodes: Population size.
        client_app: The ClientApp for non-train messages (pollinate's by default).
        threads: torch intra-op threads for cohort training (the server itself uses one).
        freeze_gc: after the first train round, ``gc.freeze()`` what the process holds (for
            a process that runs one simulation: see ``simulation.runner``).
        latency: Simulated reply times and drop-outs of train messages
            (:mod:`~pollinate.simulation.latency`); none by default.
    """

    #: every node is registered from the start: the server need not wait for nodes to settle
    static_population = True
    #: replies are made in ``send_and_receive`` itself: no polling (serverapp.transport)
    delivers_in_process = True

    def __init__(
        self,
        num_nodes: int,
        *,
        client_app: ClientApp | None = None,
        threads: int = 1,
        freeze_gc: bool = False,
        latency: LatencyModel | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        #: node ``first + i`` is partition ``i``, with the key pollinate's ClientApp gives it:
        #: the server's directory knows every key without a ``query`` (None: another app)
        self.partition_nodes: tuple[int, int] | None = None
        if client_app is None:
            from pollinate.clientapp.app import app as default_app

            client_app = default_app
            self.partition_nodes = (_NODE_BASE, num_nodes)
        self._app: ClientApp = client_app
        self._num_nodes = num_nodes
        self._threads = max(1, threads)
        self._freeze_gc = freeze_gc
        self._trainer = CohortTrainer(threads=self._threads, array=LocalArray.owning)
        self._contexts: dict[int, Context] = {}
        self._journal_dir: Path | None = None
        self._journal: dict[str, dict[str, Any]] = {}
        self._restored: set[int] = set()
        self._next_id = 0
        self.network = SimulatedNetwork(latency or LatencyModel())
        self._queued: dict[str, tuple[Message, float]] = {}  # pushed train messages, arrival
        self._run = Run.create_empty(run_id=1)
        _ensure_identity(self._run.run_id)

    # ------------------------------------------------------------ Grid interface

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(_NODE_BASE, _NODE_BASE + self._num_nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue ``messages``: each reply waits in the simulated network until the clock
        passes its arrival (at once without a latency model; never for a drop-out).

        Train messages are trained lazily, all queued ones as one cohort, when a reply the
        server pulls is due: a reply does not depend on when it is computed (its model is in
        its message; a client has one task at a time), and one cohort of many clients costs
        about what one client costs."""
        messages = list(messages)
        delays = self._delays(messages)
        now = [(m, d) for m, d in zip(messages, delays, strict=True) if d is not None]
        for msg, delay in now:
            if _is_train(msg):
                self._queued[msg.metadata.message_id] = (msg, self.network.clock + delay)
        for reply in self._deliver([m for m, _ in now if not _is_train(m)]):
            self.network.send(reply.metadata.reply_to_message_id, reply, 0.0)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        clock = self.network.clock
        if any(q[1] <= clock for mid in message_ids if (q := self._queued.get(mid))):
            queued, self._queued = self._queued, {}
            arrival = {mid: at for mid, (_, at) in queued.items()}
            for reply in self._deliver([m for m, _ in queued.values()]):
                mid = reply.metadata.reply_to_message_id
                self.network.send(mid, reply, arrival[mid] - clock)
        return self.network.pull(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Handle ``messages`` and return the replies; with a latency model, drop-outs get
        none and the clock moves on by the round's slowest reply (or ``timeout``)."""
        messages = list(messages)
        delays = self._delays(messages)
        self.network.wait_round([d for m, d in zip(messages, delays, strict=True)
                                 if _is_train(m)], timeout)  # fmt: skip
        return self._deliver([m for m, d in zip(messages, delays, strict=True) if d is not None])

    # ------------------------------------------------------------ simulated time

    @property
    def simulates_time(self) -> bool:
        """Whether a latency model runs (the clock then means something)."""
        return self.network.model.enabled

    def now(self) -> float:
        """Simulated seconds since the grid was made."""
        return self.network.clock

    def advance(self, deadline: float) -> None:
        """Move the clock to the next reply's arrival, or to ``deadline`` if that is sooner."""
        clock = self.network.clock
        first_queued = min((at for _, at in self._queued.values() if at > clock), default=deadline)
        self.network.advance(min(deadline, first_queued))

    def _delays(self, messages: list[Message]) -> list[float | None]:
        """Each message's reply time (``None``: a drop-out), with ids given on the way."""
        delays: list[float | None] = []
        for msg in messages:
            self._next_id += 1
            msg.metadata.__dict__["_message_id"] = f"local-{self._next_id}"
            delay: float | None = 0.0
            if self.simulates_time and _is_train(msg):
                delay = self.network.latency(msg.metadata.dst_node_id - _NODE_BASE)
            delays.append(delay)
        return delays

    def _deliver(self, messages: list[Message]) -> list[Message]:
        replies: list[Message] = []
        train: list[tuple[Message, Context]] = []
        for msg in messages:
            context = self._context(msg.metadata.dst_node_id)
            if _is_train(msg):
                train.append((msg, context))
            else:
                replies.append(self._call_app(msg, context))
        if train:
            replies.extend(self._train(train))
        return replies

    # ------------------------------------------------------------ nodes

    def _context(self, node_id: int) -> Context:
        partition = node_id - _NODE_BASE
        if not 0 <= partition < self._num_nodes:
            raise ValueError(f"no node {node_id} in this simulation")
        context = self._contexts.get(partition)
        if context is None:
            context = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config={"partition-id": partition, "num-partitions": self._num_nodes},
                state=RecordDict(),
                run_config={},
            )
            self._contexts[partition] = context
        return context

    def _call_app(self, msg: Message, context: Context) -> Message:
        try:
            return self._app(msg, context)
        except Exception as err:  # a failing client is a failed reply, as under Flower
            return error_reply(msg, err)

    # ------------------------------------------------------------ training

    def _train(self, batch: list[tuple[Message, Context]]) -> list[Message]:
        replies: list[Message] = []
        jobs: list[tuple[TrainJob, Context]] = []
        parsed: dict[int, ClientTask] = {}  # a strategy sends one config object to all
        for msg, context in batch:
            try:
                config = record_of(msg.content, "config", ConfigRecord)
                if config is None:
                    raise ValueError("a train message without its 'config' ConfigRecord")
                task = parsed.get(id(config))
                if task is None:
                    task = parsed[id(config)] = ClientTask.from_config(config)
                self._restore(context, task)
                job = begin_train(msg, context, mirror=False, task=task)
            except Exception as err:
                replies.append(error_reply(msg, err))
                continue
            if isinstance(job, Message):  # declined: past its budget
                replies.append(job)
            else:
                jobs.append((job, context))
        for cohort in _cohorts(jobs):
            replies.extend(self._trainer.train(cohort))
        self._write_journal([(job, ctx) for job, ctx in jobs if job.task.dp])
        if self._freeze_gc and jobs:
            self._freeze_gc = False
            gc.freeze()  # the first round's imports (torch.func's dynamo) join start-up's
        return replies

    # ------------------------------------------------------------ accountant journal

    def _restore(self, context: Context, task: ClientTask) -> None:
        """Before a node's first train: its accountant from the journal or its own file."""
        partition = int(context.node_config["partition-id"])
        if partition in self._restored:
            return
        self._restored.add(partition)
        if not task.client_state_dir:
            return
        self._open_journal(Path(task.client_state_dir))
        key = client_key(context)
        best = ClientAccountant()
        if key in self._journal:
            best = ClientAccountant.from_record(self._journal[key])
        own_file = Path(task.client_state_dir) / f"{key}.accountant.json"
        if own_file.exists():
            from_file = ClientAccountant.load(own_file)
            if from_file.total_steps > best.total_steps:
                best = from_file
        if best.total_steps > 0:
            context.state.config_records[ACCOUNTANT_KEY] = ConfigRecord(best.to_record())  # type: ignore[arg-type]

    def _open_journal(self, folder: Path) -> None:
        if self._journal_dir == folder:
            return
        self._journal_dir = folder
        self._journal = read_journal(folder / JOURNAL_NAME)
        if self._journal:
            # compact: one line per client, written atomically
            lines = [json.dumps({"client": k, "record": r}) for k, r in self._journal.items()]
            atomic_write_text(folder / JOURNAL_NAME, "\n".join(lines) + "\n")
            logger.info("restored %d client accountants from %s", len(lines), folder)

    def _write_journal(self, jobs: list[tuple[TrainJob, Context]]) -> None:
        if not jobs or self._journal_dir is None:
            return
        lines = []
        for job, context in jobs:
            record = record_of(context.state, ACCOUNTANT_KEY, ConfigRecord)
            if record is None:
                continue
            entry = {k: v for k, v in record.items() if isinstance(v, list)}
            self._journal[job.key] = entry
            lines.append(json.dumps({"client": job.key, "record": entry}))
        if not lines:
            return
        append_lines(self._journal_dir / JOURNAL_NAME, lines)


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of every client in an accountant journal (a torn last line is skipped)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            records[str(entry["client"])] = dict(entry["record"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d: unreadable accountant record skipped", path, number)
    return records


def _cohorts(jobs: list[tuple[TrainJob, Context]]) -> Iterator[list[tuple[TrainJob, Context]]]:
    """Jobs that share the global model and the training config, in arrival order."""
    groups: dict[tuple[int, tuple[Any, ...]], list[tuple[TrainJob, Context]]] = {}
    for job, context in jobs:
        t = job.task
        config = (t.model, t.fix_model, t.input_shape, t.num_outputs, job.settings)
        arrays = id(record_of(job.msg.content, "arrays", ArrayRecord))
        groups.setdefault((arrays, config), []).append((job, context))
    yield from groups.values()


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] == "train"


def _ensure_identity(run_id: int) -> None:
    """Messages need the process' task identity; set it as the SuperLink's if unset."""
    try:
        TaskIdentity.node_id  # noqa: B018 - raises when unset
    except RuntimeError:
        TaskIdentity.run_id = run_id
        TaskIdentity.task_id = int(time.time())
        TaskIdentity.node_id = SUPERLINK_NODE_ID
