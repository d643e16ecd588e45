"""The server's record of a run's privacy spending.

Two guarantees are kept apart here:

* **sample-level** epsilon: each client's DP-SGD accountant, reported by the client after each
  round it trains in (cumulative over all its rounds);
* **client-level** epsilon: the server's DP-FedAvg accountant over the released aggregates.

They protect different things (one example of a client vs. a whole client) and are reported side
by side. They are never added.

:class:`PrivacyLedger` keeps the history and checks that it is consistent; the records it holds
are in :mod:`~pollinate.privacy.ledger_entries`, its summary statistics in
:mod:`~pollinate.privacy.ledger_summary`, its document format in
:mod:`~pollinate.privacy.ledger_io` and its append-only database in
:mod:`~pollinate.privacy.ledger_store` (:meth:`PrivacyLedger.flush` writes what is new).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.privacy._checks import check_delta, check_integer
from pollinate.privacy.ledger_entries import ClientLevelEntry, ClientRoundEntry, DeclineEntry
from pollinate.privacy.ledger_io import (
    check_document,
    document_entries,
    read_document,
    to_document,
    to_json,
    write_json,
)
from pollinate.privacy.ledger_store import LedgerRows, LedgerStore
from pollinate.privacy.ledger_summary import (
    client_level_summary,
    ledger_summary,
    max_and_median,
    sample_level_summary,
)

__all__ = ["PrivacyLedger"]


class PrivacyLedger:
    """Server-side record of a run's privacy spending, per client and per round.

    Clients are identified by a stable string key (e.g. the partition id).

    Args:
        delta: The run's target delta, in (0, 1).
        sample_level: Whether sample-level DP (DP-SGD on clients) is enabled.
        client_level: Whether client-level DP (DP-FedAvg on the server) is enabled.
    """

    def __init__(
        self, *, delta: float, sample_level: bool, client_level: bool,
        reproducible_noise: bool = False,
    ) -> None:  # fmt: skip
        """Create an empty ledger (``reproducible_noise``: a test run, NOT PRIVATE)."""
        self._delta = check_delta(delta)
        self._reproducible_noise = bool(reproducible_noise)
        if not isinstance(sample_level, bool) or not isinstance(client_level, bool):
            raise ConfigError("sample_level and client_level must be booleans")
        self._sample_level = sample_level
        self._client_level = client_level
        self._clients: list[ClientRoundEntry] = []
        self._declines: list[DeclineEntry] = []
        self._releases: list[ClientLevelEntry] = []
        self._latest: dict[str, ClientRoundEntry] = {}
        self._released_to: set[str] = set()  # clients in any client-level release
        self._flushed: tuple[int, int, int] = (0, 0, 0)  # entries already in the database

    def __repr__(self) -> str:
        """Short description."""
        return (
            f"PrivacyLedger(delta={self._delta:g}, clients={len(self._latest)}, "
            f"client_entries={len(self._clients)}, declines={len(self._declines)}, "
            f"releases={len(self._releases)})"
        )

    @property
    def delta(self) -> float:
        """The run's target delta."""
        return self._delta

    @property
    def entries(self) -> tuple[ClientRoundEntry, ...]:
        """All sample-level client reports, in recording order."""
        return tuple(self._clients)

    @property
    def declines(self) -> tuple[DeclineEntry, ...]:
        """All declines, in recording order."""
        return tuple(self._declines)

    @property
    def releases(self) -> tuple[ClientLevelEntry, ...]:
        """All client-level entries, in recording order."""
        return tuple(self._releases)

    # ------------------------------------------------------------ recording

    def record_client(
        self,
        *,
        server_round: int,
        client: str,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        release: str = "train",
    ) -> None:
        """Record a client's cumulative sample-level epsilon after it trained in a round.

        ``release`` names what the client released: ``"train"`` (its DP-SGD update) or
        ``"evaluate"`` (noised evaluation counts, charged to the same accountant, in a round
        it may also have trained in).

        Raises:
            ConfigError: If a parameter is invalid.
            ValueError: If the epsilon is lower than the client's previous one, or the round is
                not later than the client's previous round (cumulative epsilon never decreases).
        """
        entry = ClientRoundEntry.checked(
            server_round=server_round,
            client=client,
            epsilon=epsilon,
            delta=delta,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            release=release,
        )
        previous = self._latest.get(entry.client)
        if previous is not None:
            later = (
                entry.server_round >= previous.server_round
                if entry.release == "evaluate"
                else entry.server_round > previous.server_round
            )
            if not later:
                raise ValueError(
                    f"client {entry.client!r}: round {entry.server_round} recorded after round "
                    f"{previous.server_round}"
                )
            if entry.epsilon < previous.epsilon:
                raise ValueError(
                    f"client {entry.client!r}: cumulative epsilon went backwards from "
                    f"{previous.epsilon} (round {previous.server_round}) to {entry.epsilon} "
                    f"(round {entry.server_round})"
                )
        if not self._sample_level:
            logger.warning(
                "recording sample-level epsilon of client %s although sample-level DP is off",
                entry.client,
            )
        if entry.delta != self._delta:
            logger.warning(
                "client %s reported epsilon at delta %g, the run's delta is %g",
                entry.client,
                entry.delta,
                self._delta,
            )
        self._clients.append(entry)
        self._latest[entry.client] = entry

    def record_decline(self, *, server_round: int, client: str, reason: str) -> None:
        """Record that ``client`` declined to train in ``server_round``, and why."""
        self._declines.append(
            DeclineEntry.checked(server_round=server_round, client=client, reason=reason)
        )

    def record_client_level(
        self,
        *,
        server_round: int,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled: int,
        population: int,
        accounting: str,
        mechanism: str = "server-fixed",
        epsilon_rdp: float | None = None,
        epsilon_pld: float | None = None,
        sensitivity: float | None = None,
        bands: int = 1,
        horizon: int = 0,
        clients: Sequence[str] = (),
        sample_rate: float = 0.0,
        count_noise: float = 0.0,
    ) -> None:
        """Record the server's cumulative client-level epsilon after a round's release.

        Raises:
            ConfigError: If a parameter is invalid.
            ValueError: If the round is not later than the previous release or the epsilon
                went backwards.
        """
        entry = ClientLevelEntry.checked(
            server_round=server_round,
            epsilon=epsilon,
            delta=delta,
            noise_multiplier=noise_multiplier,
            clipping_norm=clipping_norm,
            num_sampled=num_sampled,
            population=population,
            accounting=accounting,
            mechanism=mechanism,
            epsilon_rdp=epsilon_rdp,
            epsilon_pld=epsilon_pld,
            sensitivity=sensitivity,
            bands=bands,
            horizon=horizon,
            clients=tuple(clients),
            sample_rate=sample_rate,
            count_noise=count_noise,
        )
        if self._releases:
            previous = self._releases[-1]
            if entry.server_round <= previous.server_round:
                raise ValueError(
                    f"client-level release of round {entry.server_round} recorded after round "
                    f"{previous.server_round}"
                )
            if entry.epsilon < previous.epsilon:
                raise ValueError(
                    f"client-level epsilon went backwards from {previous.epsilon} to "
                    f"{entry.epsilon} (round {entry.server_round})"
                )
        if not self._client_level:
            logger.warning("recording client-level epsilon although client-level DP is off")
        self._releases.append(entry)
        self._released_to.update(entry.clients)

    def truncate_after(self, server_round: int) -> None:
        """Drop every entry of a round later than ``server_round`` (used when resuming)."""
        last = check_integer("server_round", server_round, low=0)
        self._clients = [e for e in self._clients if e.server_round <= last]
        self._declines = [e for e in self._declines if e.server_round <= last]
        self._releases = [e for e in self._releases if e.server_round <= last]
        self._latest = {}
        for entry in self._clients:
            self._latest[entry.client] = entry
        self._released_to = {c for release in self._releases for c in release.clients}
        clients, declines, releases = self._flushed
        self._flushed = (
            min(clients, len(self._clients)),
            min(declines, len(self._declines)),
            min(releases, len(self._releases)),
        )

    # ------------------------------------------------------------ queries

    def client_level_rounds(self) -> dict[str, list[int]]:
        """The rounds whose client-level release summed each client's update, oldest first."""
        out: dict[str, list[int]] = {}
        for release in self._releases:
            for client in release.clients:
                out.setdefault(client, []).append(release.server_round)
        return out

    def clients_seen(self) -> frozenset[str]:
        """Every client with a history here: it trained, evaluated under DP, or its update
        was in a client-level release (a client never seen has spent nothing)."""
        return frozenset(self._latest) | self._released_to

    def client_epsilons(self) -> dict[str, float]:
        """The latest cumulative sample-level epsilon of each client that trained."""
        return {client: entry.epsilon for client, entry in self._latest.items()}

    def sample_level_range(self) -> tuple[float | None, float | None]:
        """:meth:`summary`'s max and median sample-level epsilon (``None``: off, or none)."""
        return max_and_median(self._latest) if self._sample_level else (None, None)

    def summary(self) -> dict[str, object]:
        """A JSON-ready summary of both guarantees, kept separate (never added).

        Statistics over clients (max, median, mean) use each client's latest cumulative epsilon
        and only clients that trained at least once; they are ``None`` when no client trained.
        """
        return ledger_summary(
            delta=self._delta,
            reproducible_noise=self._reproducible_noise,
            sample_level=sample_level_summary(
                enabled=self._sample_level,
                entries=self._clients,
                latest=self._latest,
                declines=len(self._declines),
            ),
            client_level=client_level_summary(enabled=self._client_level, releases=self._releases),
        )

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, object]:
        """The full ledger, including the per-round history, as JSON-ready data."""
        return to_document(
            delta=self._delta,
            sample_level=self._sample_level,
            client_level=self._client_level,
            reproducible_noise=self._reproducible_noise,
            clients=self._clients,
            declines=self._declines,
            releases=self._releases,
            summary=self.summary(),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_dict` output (the ``summary`` key is ignored).

        The history is replayed through the ``record_*`` methods, so it is checked as it was
        when it was recorded.

        Raises:
            ConfigError: If the data is malformed or inconsistent.
        """
        check_document(d)
        keys = ("clients", "declines", "client_level_releases")
        return cls._replay(d, (document_entries(d, key) for key in keys), "privacy ledger")

    @classmethod
    def from_store(cls, store: LedgerStore) -> PrivacyLedger:
        """Rebuild a ledger from its database, as :meth:`from_dict` (a ``ConfigError`` if
        the database is missing, unreadable or inconsistent)."""
        meta = store.settings()
        rows: LedgerRows = store.load()
        entries = ((vars(entry) for entry in kind) for kind in rows)
        ledger = cls._replay(meta, entries, f"privacy ledger database {store.path}")
        ledger._flushed = (len(rows[0]), len(rows[1]), len(rows[2]))
        return ledger

    @classmethod
    def _replay(
        cls, settings: Mapping[str, Any], rows: Iterable[Iterable[Mapping[str, Any]]], what: str
    ) -> PrivacyLedger:
        """A ledger of ``settings`` with the client, decline and release ``rows`` recorded."""
        try:
            ledger = cls(
                delta=settings["delta"],
                sample_level=settings["sample_level"],
                client_level=settings["client_level"],
                reproducible_noise=bool(settings.get("reproducible_noise", False)),
            )
            records: list[Callable[..., None]] = [ledger.record_client, ledger.record_decline]
            records.append(ledger.record_client_level)
            for items, record in zip(rows, records, strict=True):
                for item in items:
                    record(**item)
        except KeyError as exc:
            raise ConfigError(f"{what} is missing the key {exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"inconsistent {what}: {exc}") from exc
        return ledger

    def settings(self) -> dict[str, object]:
        """What the ledger was created with (the database's ``meta``)."""
        return {
            "delta": self._delta,
            "sample_level": self._sample_level,
            "client_level": self._client_level,
            "reproducible_noise": self._reproducible_noise,
        }

    def flush(self, store: LedgerStore) -> None:
        """Append the entries recorded since the last flush to ``store``, in one transaction
        (what is written follows the entries that are new, not the history)."""
        clients, declines, releases = self._flushed
        store.append(self._clients[clients:], self._declines[declines:], self._releases[releases:])
        self._flushed = (len(self._clients), len(self._declines), len(self._releases))

    def to_json(self) -> str:
        """The ledger as readable JSON (indent 2, sorted keys)."""
        return to_json(self.to_dict())

    def save(self, path: Path) -> None:
        """Write the ledger to ``path`` as JSON, atomically (temp file, fsync, replace)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`.

        Raises:
            ConfigError: If the file is missing, unreadable or corrupt; the message names it.
        """
        path = Path(path)
        data = read_document(path)
        try:
            return cls.from_dict(data)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(f"corrupt privacy ledger file {path}: {exc}") from exc
