"""The privacy ledger on disk during a run: an append-only SQLite database.

One row per client-round release (and per decline, and per client-level release), indexed by
client and round. After each round :meth:`LedgerStore.append` writes that round's new rows in
one transaction (WAL journal, ``synchronous=FULL``), so the bytes written per round follow the
cohort, not the run's history, and a crash leaves the database as it was after the last
committed round. A resume reads the rows back (:meth:`LedgerStore.load`) and drops those of
rounds after the checkpoint it resumes from (:meth:`LedgerStore.truncate_after`).

``privacy.json`` stays the ledger's summary (every round) and, at the end of a run, the whole
history as one document (:mod:`pollinate.privacy.ledger_io`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from pollinate.errors import ConfigError
from pollinate.privacy.ledger_entries import ClientLevelEntry, ClientRoundEntry, DeclineEntry

__all__ = ["LEDGER_FILE", "LedgerRows", "LedgerStore"]

#: the run directory's ledger database
LEDGER_FILE = "ledger.sqlite"

_VERSION = 1
_CLIENT_COLUMNS = tuple(f.name for f in fields(ClientRoundEntry))
_DECLINE_COLUMNS = tuple(f.name for f in fields(DeclineEntry))
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS client_rounds (
    seq INTEGER PRIMARY KEY, {", ".join(_CLIENT_COLUMNS)});
CREATE INDEX IF NOT EXISTS client_rounds_client ON client_rounds (client, server_round);
CREATE INDEX IF NOT EXISTS client_rounds_round ON client_rounds (server_round);
CREATE TABLE IF NOT EXISTS declines (seq INTEGER PRIMARY KEY, {", ".join(_DECLINE_COLUMNS)});
CREATE INDEX IF NOT EXISTS declines_client ON declines (client, server_round);
CREATE TABLE IF NOT EXISTS releases (server_round INTEGER PRIMARY KEY, entry TEXT NOT NULL);
"""

LedgerRows = tuple[list[ClientRoundEntry], list[DeclineEntry], list[ClientLevelEntry]]


class LedgerStore:
    """The ledger database of one run directory (``RUN_DIR/ledger.sqlite``).

    Each call opens and closes its own connection: nothing is held between rounds, and a
    crashed process leaves no lock behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        """Whether the database file is there."""
        return self.path.is_file()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            with closing(sqlite3.connect(self.path, isolation_level=None)) as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                yield db
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"cannot use the privacy ledger database {self.path}: {exc}; if the disk is "
                "full, free space and resume the run"
            ) from exc

    def create(self, settings: dict[str, object]) -> None:
        """Make an empty ledger with the run's ledger ``settings`` (replacing any old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            rows = [("version", json.dumps(_VERSION))]
            rows += [(k, json.dumps(v)) for k, v in sorted(settings.items())]
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)
            db.execute("COMMIT")

    def append(
        self,
        clients: Sequence[ClientRoundEntry],
        declines: Sequence[DeclineEntry],
        releases: Sequence[ClientLevelEntry],
    ) -> None:
        """Add rows in one transaction: all of them or, after a crash, none."""
        if not (clients or declines or releases):
            return
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                f"INSERT INTO client_rounds ({', '.join(_CLIENT_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_CLIENT_COLUMNS))})",
                [tuple(getattr(e, c) for c in _CLIENT_COLUMNS) for e in clients],
            )
            db.executemany(
                f"INSERT INTO declines ({', '.join(_DECLINE_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_DECLINE_COLUMNS))})",
                [tuple(getattr(e, c) for c in _DECLINE_COLUMNS) for e in declines],
            )
            db.executemany(
                "INSERT OR REPLACE INTO releases VALUES (?, ?)",
                [(e.server_round, json.dumps(_plain(e), sort_keys=True)) for e in releases],
            )
            db.execute("COMMIT")

    def truncate_after(self, server_round: int) -> None:
        """Delete every row of a round later than ``server_round`` (one transaction)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            for table in ("client_rounds", "declines", "releases"):
                db.execute(f"DELETE FROM {table} WHERE server_round > ?", (server_round,))
            db.execute("COMMIT")

    def settings(self) -> dict[str, Any]:
        """The ledger settings given to :meth:`create` (and the format version)."""
        with self._connect() as db:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        if meta.get("version") != _VERSION:
            raise ConfigError(
                f"privacy ledger database {self.path} has unsupported version "
                f"{meta.get('version')!r}; resume it with the pollinate version that wrote it"
            )
        return meta

    def load(self) -> LedgerRows:
        """Every row, in the order it was written."""
        if not self.exists():
            raise ConfigError(f"the privacy ledger database {self.path} is missing")
        with self._connect() as db:
            clients = [
                ClientRoundEntry(**dict(zip(_CLIENT_COLUMNS, row, strict=True)))
                for row in db.execute(
                    f"SELECT {', '.join(_CLIENT_COLUMNS)} FROM client_rounds ORDER BY seq"
                )
            ]
            declines = [
                DeclineEntry(**dict(zip(_DECLINE_COLUMNS, row, strict=True)))
                for row in db.execute(
                    f"SELECT {', '.join(_DECLINE_COLUMNS)} FROM declines ORDER BY seq"
                )
            ]
            releases = [
                _release(json.loads(text))
                for (text,) in db.execute("SELECT entry FROM releases ORDER BY server_round")
            ]
        return clients, declines, releases

    def client_history(self, client: str) -> list[ClientRoundEntry]:
        """One client's rows, oldest first (the client index answers it)."""
        with self._connect() as db:
            return [
                ClientRoundEntry(**dict(zip(_CLIENT_COLUMNS, row, strict=True)))
                for row in db.execute(
                    f"SELECT {', '.join(_CLIENT_COLUMNS)} FROM client_rounds "
                    "WHERE client = ? ORDER BY server_round, seq",
                    (client,),
                )
            ]

    def copy_to(self, path: Path) -> None:
        """A consistent copy of the database at ``path`` (SQLite's online backup: a write in
        progress is not half-copied)."""
        with self._connect() as db, closing(sqlite3.connect(path)) as copy:
            db.backup(copy)

    def size(self) -> int:
        """Bytes on disk: the database and its write-ahead log."""
        return sum(
            Path(f"{self.path}{suffix}").stat().st_size
            for suffix in ("", "-wal")
            if Path(f"{self.path}{suffix}").exists()
        )


def _plain(entry: ClientLevelEntry) -> dict[str, object]:
    out = dict(vars(entry))
    out["clients"] = list(entry.clients)
    return out


def _release(data: dict[str, Any]) -> ClientLevelEntry:
    data["clients"] = tuple(data.get("clients", ()))
    return ClientLevelEntry(**data)
