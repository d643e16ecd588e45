"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022) on any grid.

With ``strategy = "fedbuff"`` the server does not wait for a round's stragglers. It keeps
``fraction-train`` of the clients training at once (the concurrency), each from the model
that was current when it was sent its task, and releases a new global model every
``buffer-size`` replies:

    new = current + lr * mean_i( weight(s_i) * (reply_i - model it started from) )

where ``s_i`` is how many releases happened while client ``i`` trained (its staleness),
``weight`` is ``staleness-weighting`` (``1/sqrt(1+s)`` by default) and ``lr`` the
``server-learning-rate``. Updates more than ``max-staleness`` versions old are counted and
dropped. Each release is one "round" of the run: a ledger round, a checkpoint, a record.

The same strategy chain does the release: each buffered update is handed to it as the
reply ``current + weight * delta``, so client-level DP (:mod:`.client_dp`) clips that
weighted delta, sums the buffer, adds one noise draw per buffer from the secure source and
divides by ``buffer-size``: one Gaussian release per buffer, accounted per release for the
clients in it (no amplification: who is in a buffer is whoever answered). A client has at
most one reply in a buffer (it is not sent a task while its reply to this buffer is in).
Under DP-SGD every reply's epsilon is recorded as it arrives, a dropped stale one included.

Messages go through the grid's own ``push_messages`` / ``pull_messages``: a real SuperLink,
Flower's simulation, or the fast engine, whose latency model (:mod:`pollinate.simulation.
latency`) makes stragglers and drop-outs in simulated time. Replies a buffer holds are kept
in :mod:`.buffer_journal` until its checkpoint is written, so a restart mid-buffer resumes
with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from pollinate.clientapp.training import seed_for
from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.protocol import record_of, records_of
from pollinate.rundir.records import RoundRecord
from pollinate.serverapp.buffer_journal import BufferEntry, BufferJournal
from pollinate.serverapp.nodes import SampledGrid
from pollinate.serverapp.rounds import (
    RoundCounts,
    account_reply,
    aggregate_sorted,
    evaluate_round,
    record_client_level,
    seed_globals,
    who_may_train,
)
from pollinate.serverapp.state import RunState, from_array_record, to_array_record
from pollinate.serverapp.strategy import set_current_model, weight_key_for
from pollinate.serverapp.tracing import phase
from pollinate.serverapp.transport import clock_of
from pollinate.serverapp.validation import reference_of, validate_update

__all__ = ["BufferedRounds"]

#: How long a real grid waits between pulls when no reply came.
POLL_S = 0.1


@dataclass
class _Flight:
    """A task sent and not answered yet."""

    key: str
    node: int
    version: int
    sent_at: float
    message: Message


class BufferedRounds:
    """FedBuff's state across releases: who trains from which model (module docstring)."""

    def __init__(self, run: RunState) -> None:
        self.run = run
        self.settings = run.settings
        self.flights: dict[str, _Flight] = {}
        self.models: dict[int, dict[str, np.ndarray]] = {}
        self.journal = BufferJournal(run.run_dir)
        self.concurrency = run.settings.sample_size(run.population)
        self._carry: list[Message] = []  # pulled replies a full buffer left for the next
        self._sending: dict[int, ArrayRecord] = {}  # the release being filled: its model
        self._clock = clock_of(run.grid)
        buffer = run.settings.buffer_size
        if buffer > run.population:
            raise ConfigError(
                f"buffer-size {buffer} is larger than the fleet ({run.population} clients): "
                f"a buffer could never fill; set buffer-size to at most {run.population}"
            )
        if buffer > self.concurrency:
            raise ConfigError(
                f"buffer-size {buffer} is more than the {self.concurrency} clients training at "
                f"once (fraction-train {run.settings.fraction_train} of {run.population}); "
                "raise fraction-train or lower buffer-size"
            )

    def now(self) -> float:
        """The grid's time: simulated on the fast engine, else wall-clock."""
        return self._clock.now() if self._clock is not None else time.monotonic()

    def saved(self, rnd: int) -> None:
        """Release ``rnd`` is in its checkpoint: its buffer journal goes."""
        self.journal.clear(rnd)

    # ------------------------------------------------------------------ one release
    def play(self, rnd: int) -> RoundRecord | None:
        """Fill buffer ``rnd`` and release it; ``None``: no client may train any more."""
        started = time.monotonic()
        run, settings = self.run, self.settings
        version = rnd - 1
        seed_globals(settings.seed, rnd)
        run.directory.refresh()
        self.models[version] = dict(run.arrays)
        counts = RoundCounts()
        entries, replied = self.journal.restore(run, rnd, counts)
        with phase("training"):
            refills = 0
            while len(entries) < settings.buffer_size:
                refills += 1
                sent = self._refill(rnd, replied, counts, refills)
                if not sent and not self.flights:
                    logger.warning(
                        "stopping before release %d: no client may train again within its "
                        "limits, and none is training", rnd,
                    )  # fmt: skip
                    return None
                replies, self._carry = self._carry, []
                if not replies and self.flights:
                    replies = list(run.grid.pull_messages(list(self.flights)))
                if not replies:
                    self._wait()
                    self._expire(rnd, replied, counts)
                    continue
                room = settings.buffer_size - len(entries)
                entries.extend(self._take(rnd, replies, replied, counts, room))
            self._forget_old_models()
        with phase("aggregation"):
            train_metrics, keys = self._release(rnd, entries)
            client_eps = record_client_level(run, rnd, keys)
        return evaluate_round(run, rnd, counts, train_metrics, client_eps, started=started)

    # ------------------------------------------------------------------ sending
    def _refill(self, rnd: int, replied: set[str], counts: RoundCounts, refill: int) -> int:
        """Send tasks to idle clients until ``concurrency`` are training; returns how many."""
        free = self.concurrency - len(self.flights)
        if free <= 0:
            return 0
        run = self.run
        busy = replied | {f.key for f in self.flights.values()}
        limits = who_may_train(run, rnd)

        def allowed(key: str) -> bool:
            return key not in busy and (limits is None or limits(key))

        known = run.ledger.clients_seen() | frozenset(busy)
        rng = np.random.default_rng(seed_for(self.settings.seed, rnd, 15, refill))
        chosen = run.directory.sample(free, rng, allowed=allowed, known=known)
        if not chosen:
            return 0
        record = self._sending.get(rnd)
        if record is None:  # one record per model: the fast engine trains what shares one
            record = to_array_record(run.arrays)  # as one cohort
            self._sending = {rnd: record}
        messages = list(
            run.strategy.configure_train(
                rnd, record, ConfigRecord(dict(run.cfg)), SampledGrid(run.grid, chosen)
            )
        )
        ids = list(run.grid.push_messages(messages))
        now = self.now()
        for msg, mid in zip(messages, ids, strict=True):
            if not mid:  # the SuperLink did not take it
                counts.failed += 1
                continue
            node = msg.metadata.dst_node_id
            self.flights[mid] = _Flight(run.directory.key_of(node), node, rnd - 1, now, msg)
        counts.sampled += len(messages)
        return len(messages)

    def _wait(self) -> None:
        """Until the next reply or the first timeout (simulated time moves at once)."""
        deadline = min(f.sent_at for f in self.flights.values()) + self.settings.round_timeout
        if self._clock is not None:
            self._clock.advance(deadline)
        else:
            time.sleep(max(0.0, min(POLL_S, deadline - self.now())))

    def _expire(self, rnd: int, replied: set[str], counts: RoundCounts) -> None:
        """Tasks unanswered for ``round-timeout`` are failed; their clients sit this one out."""
        now = self.now()
        late = [mid for mid, f in self.flights.items()  # the very sum _wait waits until
                if now >= f.sent_at + self.settings.round_timeout]  # fmt: skip
        for mid in late:
            flight = self.flights.pop(mid)
            replied.add(flight.key)
            counts.failed += 1
            logger.warning(
                "release %d: client %s did not reply within %.0f s", rnd, flight.key,
                self.settings.round_timeout,
            )  # fmt: skip

    # ------------------------------------------------------------------ receiving
    def _take(
        self, rnd: int, replies: list[Message], replied: set[str], counts: RoundCounts, room: int
    ) -> list[BufferEntry]:
        """Account each reply, keep the acceptable fresh ones; journal them all. Once
        ``room`` updates are kept, the replies left wait for the next buffer."""
        run, version = self.run, rnd - 1
        reference = reference_of(run.arrays)
        weight_key = weight_key_for(self.settings)
        events: list[dict[str, Any]] = []
        taken: dict[int, BufferEntry] = {}
        for index, reply in enumerate(replies):
            if len(taken) == room:
                self._carry = replies[index:]
                break
            flight = self.flights.pop(reply.metadata.reply_to_message_id, None)
            if flight is None:  # it timed out before; its client already sat this one out
                continue
            replied.add(flight.key)
            event: dict[str, Any] = {"key": flight.key, "node": flight.node,
                                     "version": flight.version}  # fmt: skip
            events.append(event)
            if reply.has_error():
                counts.failed += 1
                event["outcome"] = "failed"
                logger.warning("release %d: client %s failed: %s", rnd, flight.key,
                               reply.error.reason)  # fmt: skip
                continue
            metrics = record_of(reply.content, "metrics", MetricRecord)
            info = record_of(reply.content, "info", ConfigRecord)
            event["metrics"] = dict(metrics) if metrics is not None else {}
            event["info"] = dict(info) if info is not None else {}
            event["outcome"] = "declined"
            if not account_reply(run, rnd, flight.key, metrics, info, counts):
                continue
            problem = validate_update(reply, self.models[flight.version],
                                      max_update_norm=run.bound, weight_key=weight_key,
                                      reference=reference)  # fmt: skip
            if problem is not None:
                counts.rejected += 1
                event["outcome"] = "rejected"
                logger.warning("release %d: update of client %s rejected: %s", rnd,
                               flight.key, problem)  # fmt: skip
                continue
            staleness = version - flight.version
            if staleness > self.settings.max_staleness:
                counts.stale += 1
                event["outcome"] = "stale"
                logger.info("release %d: update of client %s is %d versions old; dropped",
                            rnd, flight.key, staleness)  # fmt: skip
                continue
            event["outcome"] = "accepted"
            start = self.models[flight.version]
            arrays = from_array_record(records_of(reply.content, ArrayRecord)[0][1])
            delta = {k: np.asarray(arrays[k], dtype=np.float32) - start[k] for k in start}
            taken[len(events) - 1] = BufferEntry(
                key=flight.key, node=flight.node, version=flight.version, delta=delta,
                metrics=event["metrics"],
            )  # fmt: skip
        self.journal.write(rnd, events, taken)
        return list(taken.values())

    def _forget_old_models(self) -> None:
        """Keep the models clients still train from (and the current one)."""
        needed = {f.version for f in self.flights.values()} | {max(self.models)}
        for version in [v for v in self.models if v not in needed]:
            del self.models[version]

    # ------------------------------------------------------------------ release
    def _release(self, rnd: int, entries: list[BufferEntry]) -> tuple[dict[str, float], list[str]]:
        """The strategy chain aggregates the buffer; returns train metrics and its clients."""
        run, version = self.run, rnd - 1
        current = run.arrays
        set_current_model(run.strategy, to_array_record(current))
        entries = sorted(entries, key=lambda e: e.key)
        replies: list[Message] = []
        for entry in entries:
            weight = self.settings.staleness_weighting.weight(version - entry.version)
            arrays = {k: (v + weight * entry.delta[k]).astype(v.dtype) for k, v in current.items()}
            content = RecordDict({"arrays": to_array_record(arrays),
                                  "metrics": MetricRecord(entry.metrics)})  # fmt: skip
            sent = Message(content, dst_node_id=entry.node, message_type="train")
            replies.append(Message(content, reply_to=sent))
        metrics = aggregate_sorted(run, rnd, replies) if replies else {}
        return metrics, [e.key for e in entries]
