"""What a ``fedbuff`` buffer holds before it is released, kept so a restart loses none of it.

A buffer fills over many pulls, and a server that stops mid-buffer must not forget the
replies it already took: their clients spent privacy budget on them, and the ledger must
show it. Every pull that brings replies appends one line per reply to
``RUN_DIR/buffer/round-NNNN/events.jsonl`` (one write, one fsync): who replied, from which
model version, with what outcome, and the metrics the ledger records (declines, the
client's cumulative epsilon). An accepted update's delta (reply minus the model the client
started from) goes beside it in ``NNNNNN.safetensors`` first, renamed into place.

After the checkpoint of round ``NNNN`` is written, its buffer folder is deleted. On resume
:meth:`BufferJournal.restore` replays the open buffer: the ledger records and counts again,
and the accepted deltas back into the buffer. A delta file a power cut tore is skipped with a
warning (the client's epsilon, in the fsynced log, is still recorded); a process crash loses
nothing. Folders of other rounds are stale (already in a checkpoint) and removed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from pollinate._atomic import append_lines
from pollinate.log import logger
from pollinate.serverapp.rounds import RoundCounts, account_reply
from pollinate.serverapp.state import RunState

__all__ = ["BUFFER_DIR", "BufferEntry", "BufferJournal"]

BUFFER_DIR = "buffer"
EVENTS = "events.jsonl"


@dataclass
class BufferEntry:
    """One accepted update waiting in the buffer.

    Attributes:
        key: The client.
        node: Its node id when it replied (to address the reply; 0 if unknown).
        version: The global model version it trained from (the number of releases before).
        delta: Its parameters minus that version's.
        metrics: Its reply's metrics (the weight key among them).
    """

    key: str
    node: int
    version: int
    delta: dict[str, np.ndarray]
    metrics: dict[str, Any]


class BufferJournal:
    """The open buffer of a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir) / BUFFER_DIR
        self._seq = 0

    def folder(self, rnd: int) -> Path:
        return self.root / f"round-{rnd:04d}"

    def write(self, rnd: int, events: list[dict[str, Any]], deltas: dict[int, BufferEntry]) -> None:
        """Append ``events`` (``deltas``: event index -> the accepted entry it made)."""
        if not events:
            return
        folder = self.folder(rnd)
        folder.mkdir(parents=True, exist_ok=True)
        for index, entry in deltas.items():
            self._seq += 1
            name = f"{self._seq:06d}.safetensors"
            tmp = folder / f".{name}.tmp"
            save_file({k: np.ascontiguousarray(v) for k, v in entry.delta.items()}, str(tmp))
            os.replace(tmp, folder / name)
            events[index]["update"] = name
        append_lines(folder / EVENTS, [json.dumps(e, sort_keys=True) for e in events])

    def clear(self, rnd: int) -> None:
        """Round ``rnd`` is in a checkpoint: its buffer is no longer needed."""
        shutil.rmtree(self.folder(rnd), ignore_errors=True)

    def restore(
        self, run: RunState, rnd: int, counts: RoundCounts
    ) -> tuple[list[BufferEntry], set[str]]:
        """Replay round ``rnd``'s open buffer into the ledger and ``counts``; returns its
        accepted entries and every client that replied in it."""
        entries: list[BufferEntry] = []
        replied: set[str] = set()
        if self.root.exists():
            for stale in self.root.iterdir():
                if stale != self.folder(rnd):
                    shutil.rmtree(stale, ignore_errors=True)
        path = self.folder(rnd) / EVENTS
        if not path.exists():
            return entries, replied
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                event = json.loads(line)
            except ValueError:
                logger.warning("%s:%d: torn buffer record skipped", path, number)
                continue
            replied.add(str(event["key"]))
            entry = self._replay(run, rnd, event, counts)
            if entry is not None:
                entries.append(entry)
        self._seq = len(lines)
        logger.info(
            "round %d: %d replies of the open buffer restored (%d updates)",
            rnd, len(replied), len(entries),
        )  # fmt: skip
        return entries, replied

    def _replay(
        self, run: RunState, rnd: int, event: dict[str, Any], counts: RoundCounts
    ) -> BufferEntry | None:
        outcome = event["outcome"]
        if outcome == "failed":
            counts.failed += 1
            return None
        metrics = MetricRecord(event.get("metrics") or {})
        info = ConfigRecord(event.get("info") or {})
        if not account_reply(run, rnd, event["key"], metrics, info, counts):
            return None
        if outcome == "rejected":
            counts.rejected += 1
            return None
        if outcome == "stale":
            counts.stale += 1
            return None
        try:
            delta = load_file(str(self.folder(rnd) / event["update"]))
        except (OSError, SafetensorError, KeyError) as err:
            logger.warning("buffered update of client %s is lost (%s)", event["key"], err)
            return None
        return BufferEntry(
            key=str(event["key"]),
            node=int(event.get("node", 0)),
            version=int(event["version"]),
            delta=delta,
            metrics=dict(event.get("metrics") or {}),
        )
