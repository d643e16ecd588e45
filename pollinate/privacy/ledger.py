"""The server's record of a run's privacy spending.

Two guarantees are kept apart here:

* **sample-level** epsilon: each client's DP-SGD accountant, reported by the client after each
  round it trains in (cumulative over all its rounds);
* **client-level** epsilon: the server's DP-FedAvg accountant over the released aggregates.

They protect different things (one example of a client vs. a whole client) and are reported side
by side. They are never added.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.privacy.accountant import write_text_atomic
from pollinate.privacy.noise import NOT_PRIVATE

__all__ = ["ClientLevelEntry", "ClientRoundEntry", "DeclineEntry", "PrivacyLedger"]

_JSON_VERSION = 1
NOTE = "sample-level and client-level epsilon are separate guarantees and are never added"
SECURE_NOISE = (
    "secure: DP sampling and noise from the operating system's CSPRNG (os.urandom), "
    "floating-point-safe Gaussian sampler; the run seed does not fix them"
)
ADJACENCY = {
    "sample_level": "add/remove one example of one client's data (Poisson-sampled Gaussian, "
    "RDP); the number of batches per epoch, which sets the sample rate, is public",
    "client_level": "add/remove one client (Gaussian, fixed clipping, no amplification)",
}


def _is_number(value: object) -> TypeGuard[int | float]:
    """True for an int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(name: str, value: object, *, low: float, low_open: bool, allow_inf: bool) -> float:
    """Validate a number against a lower bound and return it as float."""
    if not _is_number(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if number < low or (low_open and number == low):
        relation = ">" if low_open else ">="
        raise ConfigError(f"{name} must be {relation} {low:g}, got {value!r}")
    return number


def _integer(name: str, value: object, *, low: int) -> int:
    """Validate an int (not a bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _delta(value: object) -> float:
    """Validate a delta in (0, 1)."""
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ConfigError(f"delta must be a number in (0, 1), got {value!r}")
    return float(value)


def _release(value: object) -> str:
    if value not in ("train", "evaluate"):
        raise ConfigError(f"release must be 'train' or 'evaluate', got {value!r}")
    return str(value)


def _text(name: str, value: object) -> str:
    """Validate a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class ClientRoundEntry:
    """One client's report after one training round (sample-level, DP-SGD).

    ``epsilon`` is cumulative over all the client's rounds; ``steps`` are the DP-SGD steps of
    this round only, run with ``noise_multiplier`` and ``sample_rate``.
    """

    server_round: int
    client: str
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    release: str = "train"


@dataclass(frozen=True)
class DeclineEntry:
    """A client that was asked to train but declined (e.g. its privacy budget is spent)."""

    server_round: int
    client: str
    reason: str


@dataclass(frozen=True)
class ClientLevelEntry:
    """The server's client-level (DP-FedAvg) epsilon after one round, cumulative."""

    server_round: int
    epsilon: float
    delta: float
    noise_multiplier: float
    clipping_norm: float
    num_sampled: int
    population: int
    accounting: str


class PrivacyLedger:
    """Server-side record of a run's privacy spending, per client and per round.

    Clients are identified by a stable string key (e.g. the partition id).

    Args:
        delta: The run's target delta, in (0, 1).
        sample_level: Whether sample-level DP (DP-SGD on clients) is enabled.
        client_level: Whether client-level DP (DP-FedAvg on the server) is enabled.
    """

    def __init__(
        self,
        *,
        delta: float,
        sample_level: bool,
        client_level: bool,
        reproducible_noise: bool = False,
    ) -> None:
        """Create an empty ledger (``reproducible_noise``: a test run, NOT PRIVATE)."""
        self._delta = _delta(delta)
        self._reproducible_noise = bool(reproducible_noise)
        if not isinstance(sample_level, bool) or not isinstance(client_level, bool):
            raise ConfigError("sample_level and client_level must be booleans")
        self._sample_level = sample_level
        self._client_level = client_level
        self._clients: list[ClientRoundEntry] = []
        self._declines: list[DeclineEntry] = []
        self._releases: list[ClientLevelEntry] = []
        self._latest: dict[str, ClientRoundEntry] = {}

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
        entry = ClientRoundEntry(
            server_round=_integer("server_round", server_round, low=0),
            client=_text("client", client),
            epsilon=_number("epsilon", epsilon, low=0.0, low_open=False, allow_inf=True),
            delta=_delta(delta),
            noise_multiplier=_number(
                "noise_multiplier", noise_multiplier, low=0.0, low_open=True, allow_inf=False
            ),
            sample_rate=_number(
                "sample_rate", sample_rate, low=0.0, low_open=True, allow_inf=False
            ),
            steps=_integer("steps", steps, low=1),
            release=_release(release),
        )
        if entry.sample_rate > 1.0:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
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
        if not isinstance(reason, str):
            raise ConfigError(f"reason must be a string, got {reason!r}")
        self._declines.append(
            DeclineEntry(
                server_round=_integer("server_round", server_round, low=0),
                client=_text("client", client),
                reason=reason,
            )
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
    ) -> None:
        """Record the server's cumulative client-level epsilon after a round's release.

        Raises:
            ConfigError: If a parameter is invalid.
            ValueError: If the round is not later than the previous release or the epsilon
                went backwards.
        """
        entry = ClientLevelEntry(
            server_round=_integer("server_round", server_round, low=0),
            epsilon=_number("epsilon", epsilon, low=0.0, low_open=False, allow_inf=True),
            delta=_delta(delta),
            noise_multiplier=_number(
                "noise_multiplier", noise_multiplier, low=0.0, low_open=False, allow_inf=False
            ),
            clipping_norm=_number(
                "clipping_norm", clipping_norm, low=0.0, low_open=True, allow_inf=False
            ),
            num_sampled=_integer("num_sampled", num_sampled, low=1),
            population=_integer("population", population, low=1),
            accounting=_text("accounting", accounting),
        )
        if entry.num_sampled > entry.population:
            raise ConfigError(
                f"num_sampled ({entry.num_sampled}) exceeds population ({entry.population})"
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

    # ------------------------------------------------------------ queries

    def client_epsilons(self) -> dict[str, float]:
        """The latest cumulative sample-level epsilon of each client that trained."""
        return {client: entry.epsilon for client, entry in self._latest.items()}

    def _sample_summary(self) -> dict[str, object]:
        """The ``sample_level`` part of :meth:`summary`."""
        epsilons = list(self.client_epsilons().values())
        steps_per_client: dict[str, int] = {}
        for entry in self._clients:
            steps_per_client[entry.client] = steps_per_client.get(entry.client, 0) + entry.steps
        noises = sorted({entry.noise_multiplier for entry in self._clients})
        rates = [entry.sample_rate for entry in self._clients]
        round_steps = [entry.steps for entry in self._clients]
        mechanism: dict[str, object] = {
            "accounting": "rdp",
            "noise_multiplier": noises[0] if len(noises) == 1 else None,
            "noise_multipliers": [noises[0], noises[-1]] if noises else None,
            "sample_rates": [min(rates), max(rates)] if rates else None,
            "steps_per_round": [min(round_steps), max(round_steps)] if round_steps else None,
        }
        return {
            "enabled": self._sample_level,
            "clients": len(epsilons),
            "max_epsilon": max(epsilons) if epsilons else None,
            "median_epsilon": float(statistics.median(epsilons)) if epsilons else None,
            "mean_epsilon": float(statistics.fmean(epsilons)) if epsilons else None,
            "total_steps_max": max(steps_per_client.values()) if steps_per_client else 0,
            "mechanism": mechanism,
            "declines": len(self._declines),
        }

    def _client_level_summary(self) -> dict[str, object]:
        """The ``client_level`` part of :meth:`summary`."""
        last = self._releases[-1] if self._releases else None
        return {
            "enabled": self._client_level,
            "epsilon": last.epsilon if last else None,
            "delta": last.delta if last else None,
            "noise_multiplier": last.noise_multiplier if last else None,
            "clipping_norm": last.clipping_norm if last else None,
            "num_sampled": last.num_sampled if last else None,
            "population": last.population if last else None,
            "releases": len(self._releases),
            "accounting": last.accounting if last else None,
        }

    def summary(self) -> dict[str, object]:
        """A JSON-ready summary of both guarantees, kept separate (never added).

        Statistics over clients (max, median, mean) use each client's latest cumulative epsilon
        and only clients that trained at least once; they are ``None`` when no client trained.
        """
        return {
            "delta": self._delta,
            "private": not self._reproducible_noise,
            "noise": NOT_PRIVATE if self._reproducible_noise else SECURE_NOISE,
            "adjacency": ADJACENCY,
            "sample_level": self._sample_summary(),
            "client_level": self._client_level_summary(),
            "note": NOTE,
        }

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, object]:
        """The full ledger, including the per-round history, as JSON-ready data."""
        return {
            "version": _JSON_VERSION,
            "delta": self._delta,
            "sample_level": self._sample_level,
            "client_level": self._client_level,
            "reproducible_noise": self._reproducible_noise,
            # flat dataclasses of plain values: a dict copy each (asdict() recurses, slowly)
            "clients": [dict(vars(entry)) for entry in self._clients],
            "declines": [dict(vars(entry)) for entry in self._declines],
            "client_level_releases": [dict(vars(entry)) for entry in self._releases],
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_dict` output (the ``summary`` key is ignored).

        Raises:
            ConfigError: If the data is malformed or inconsistent.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"privacy ledger must be a mapping, got {type(d).__name__}")
        if d.get("version") != _JSON_VERSION:
            raise ConfigError(f"privacy ledger has unsupported version {d.get('version')!r}")
        try:
            ledger = cls(
                delta=d["delta"],  # type: ignore[arg-type]
                sample_level=d["sample_level"],  # type: ignore[arg-type]
                client_level=d["client_level"],  # type: ignore[arg-type]
                reproducible_noise=bool(d.get("reproducible_noise", False)),
            )
            for key, method, fields in (
                ("clients", ledger.record_client, ClientRoundEntry),
                ("declines", ledger.record_decline, DeclineEntry),
                ("client_level_releases", ledger.record_client_level, ClientLevelEntry),
            ):
                items = d[key]
                if not isinstance(items, list):
                    raise ConfigError(f"privacy ledger key {key!r} must be a list")
                expected = set(fields.__dataclass_fields__)
                for item in items:
                    if not isinstance(item, dict) or set(item) | {"release"} != expected | {
                        "release"
                    }:
                        raise ConfigError(f"malformed privacy ledger {key} entry: {item!r}")
                    method(**item)
        except KeyError as exc:
            raise ConfigError(f"privacy ledger is missing the key {exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"inconsistent privacy ledger: {exc}") from exc
        return ledger

    def to_json(self) -> str:
        """The ledger as readable JSON (indent 2, sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        """Write the ledger to ``path`` as JSON, atomically (temp file, fsync, replace)."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`.

        Raises:
            ConfigError: If the file is missing, unreadable or corrupt; the message names it.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read privacy ledger file {path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"corrupt privacy ledger file {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"corrupt privacy ledger file {path}: {exc}") from exc

    def truncate_after(self, server_round: int) -> None:
        """Drop every entry of a round later than ``server_round`` (used when resuming)."""
        last = _integer("server_round", server_round, low=0)
        self._clients = [e for e in self._clients if e.server_round <= last]
        self._declines = [e for e in self._declines if e.server_round <= last]
        self._releases = [e for e in self._releases if e.server_round <= last]
        self._latest = {}
        for entry in self._clients:
            self._latest[entry.client] = entry
