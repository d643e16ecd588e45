"""The records of an A/B experiment, shared by every worker process of one server.

One SQLite file per experiment, ``STATE_DIR/NAME.sqlite``, in WAL mode (a reader never waits
for a writer; each write is one short transaction, committed before the reply is sent):

* ``answers``: one row per request the experiment answered, by any worker: request id -> arm
  and predicted classes (JSON). Feedback sent to any worker finds it. The oldest rows beyond
  about ``memory`` are pruned.
* ``outcomes``: one row per accepted feedback, numbered in commit order (``seq``). The request
  id is unique, so a second feedback for one answer is refused by the database, whichever
  worker each one reached.

Each worker replays the outcomes it has not seen, in ``seq`` order, into its own
:class:`~pollinate.serving.abtest.SequentialTest` (``ab_routing.py``), so every worker, and
``pollinate serve ab status``, holds the same test: the mSPRT's running p-value and interval
depend on the order of the outcomes, and that order is ``seq``.

Beside it, ``STATE_DIR/NAME.json`` is the experiment's test as of outcome ``seq``, saved by
the workers (:func:`read_state`); :func:`read_status` replays the store's later outcomes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.errors import ConfigError, DataError
from pollinate.serving.abtest import SequentialTest, VariantReport

__all__ = [
    "STATE_FORMAT",
    "ExperimentStatus",
    "OutcomeStore",
    "Recorded",
    "identity",
    "read_outcomes",
    "read_state",
    "read_status",
]

STATE_FORMAT = "pollinate.ab/1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (id TEXT PRIMARY KEY, arm INTEGER NOT NULL, classes TEXT);
CREATE TABLE IF NOT EXISTS outcomes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
    arm INTEGER NOT NULL, value REAL NOT NULL
);
"""
#: seconds a write waits for another worker's transaction
BUSY_TIMEOUT_S = 10.0

Recorded = tuple[int, int, float]
"""One outcome: its sequence number, arm and value."""


def _connect(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; never corrupt
        db.executescript(_SCHEMA)
    except sqlite3.Error as err:
        raise DataError(f"A/B outcome store {path} cannot be opened: {err}") from None
    return db


class OutcomeStore:
    """The answers and outcomes of one experiment in ``path`` (created if missing)."""

    def __init__(self, path: Path, *, memory: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._memory = memory
        self._prune_every = max(1, min(1000, memory // 10))
        self._lock = threading.Lock()  # the event loop and the saver's thread share it
        self._db = _connect(self.path)

    def claim(self, identity: str) -> str:
        """The experiment the store records (``identity`` if it was new)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('identity', ?)", (identity,)
            )
            row = self._db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        return str(row[0])

    def last_seq(self) -> int:
        """The number of the last outcome recorded (0: none)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM outcomes").fetchone()
        return int(row[0] or 0)

    def remember(self, request_id: str, arm: int, classes: list[int] | None) -> None:
        """Record that ``arm`` answered ``request_id`` (predicting ``classes``)."""
        text = None if classes is None else json.dumps(classes)
        with self._lock:
            row = self._db.execute(
                "INSERT OR REPLACE INTO answers (id, arm, classes) VALUES (?, ?, ?)",
                (request_id, arm, text),
            ).lastrowid
            if row is not None and row % self._prune_every == 0:
                self._db.execute("DELETE FROM answers WHERE rowid <= ?", (row - self._memory,))

    def answer(self, request_id: str) -> tuple[int, list[int] | None, bool] | None:
        """The arm that answered ``request_id``, its classes, and whether it has its outcome
        (None: no such answer)."""
        with self._lock:
            row = self._db.execute(
                "SELECT a.arm, a.classes, o.seq IS NOT NULL FROM answers a "
                "LEFT JOIN outcomes o ON o.id = a.id WHERE a.id = ?",
                (request_id,),
            ).fetchone()
        if row is None:
            return None
        classes = None if row[1] is None else [int(c) for c in json.loads(row[1])]
        return int(row[0]), classes, bool(row[2])

    def settle(self, request_id: str, arm: int, value: float) -> bool:
        """Record the outcome of ``request_id``; False if it has one already."""
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO outcomes (id, arm, value) VALUES (?, ?, ?)",
                    (request_id, arm, value),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def outcomes(self, after: int) -> list[Recorded]:
        """The outcomes numbered after ``after``, in order."""
        with self._lock:
            return _select(self._db, after)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _select(db: sqlite3.Connection, after: int) -> list[Recorded]:
    rows = db.execute(
        "SELECT seq, arm, value FROM outcomes WHERE seq > ? ORDER BY seq", (after,)
    ).fetchall()
    return [(int(seq), int(arm), float(value)) for seq, arm, value in rows]


def read_outcomes(path: Path, after: int) -> list[Recorded]:
    """The outcomes numbered after ``after`` in the store ``path`` ([] if there is none)."""
    if not Path(path).is_file():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            return _select(db, after)
        finally:
            db.close()
    except sqlite3.Error as err:
        raise DataError(f"A/B outcome store {path} is unreadable: {err}") from None


# ---------------------------------------------------------------------- the saved state
def identity(state: dict[str, Any]) -> tuple[Any, ...]:
    """What must not change while an experiment runs: its arms, metric and test settings."""
    test = state["test"]
    arms = [(v["name"], v["model"], v["version"]) for v in state["variants"]]
    return state["metric"], arms, test["alpha"], test["mixture_sd"]


def read_state(path: Path) -> dict[str, Any]:
    """A saved state file, checked (DataError naming the file if it is not one)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, not {STATE_FORMAT!r}")
        SequentialTest.from_dict(state["test"])
        identity(state)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"A/B state file {path} is unreadable: {err}") from err
    return dict(state)


@dataclass(frozen=True)
class ExperimentStatus:
    """One saved experiment, as ``pollinate serve ab status`` shows it."""

    name: str
    model: str
    metric: str
    alpha: float
    margin: float
    saved: str
    targets: dict[str, str]  # variant -> model or model/version
    weights: dict[str, float]
    reports: list[VariantReport]


def read_status(state_dir: Path) -> list[ExperimentStatus]:
    """Every experiment saved in ``state_dir``, with the test's report now (the outcomes
    recorded since the last save included)."""
    if not Path(state_dir).is_dir():
        raise ConfigError(
            f"A/B state directory {state_dir} does not exist; pass the server's [ab] state-dir "
            "(or its --config file)"
        )
    out = []
    for path in sorted(Path(state_dir).glob("*.json")):
        state = read_state(path)
        test = SequentialTest.from_dict(state["test"])
        for _seq, arm, value in read_outcomes(path.with_suffix(".sqlite"), state.get("seq", 0)):
            test.observe(arm, value)
        variants = state["variants"]
        names = [v["name"] for v in variants]
        out.append(
            ExperimentStatus(
                name=state["experiment"], model=state["model"], metric=state["metric"],
                alpha=test.alpha, margin=float(state["margin"]), saved=str(state["saved"]),
                targets={v["name"]: v["model"] + (f"/{v['version']}" if v["version"] else "")
                         for v in variants},
                weights={v["name"]: float(v["weight"]) for v in variants},
                reports=test.report(names, float(state["margin"])),
            )
        )  # fmt: skip
    if not out:
        raise ConfigError(f"A/B state directory {state_dir} holds no experiment (*.json) yet")
    return out
