"""The per-round records of the privacy ledger, each checked field by field.

* :class:`ClientRoundEntry`: one client's sample-level (DP-SGD) report after a round;
* :class:`DeclineEntry`: a client that was asked to train and declined;
* :class:`ClientLevelEntry`: the server's client-level (DP-FedAvg) epsilon after a round.

Each class's ``checked`` constructor validates one record on its own; the checks that compare a
record with earlier ones (rounds move forward, cumulative epsilon never decreases) belong to
:class:`~pollinate.privacy.ledger.PrivacyLedger`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.errors import ConfigError
from pollinate.privacy._checks import check_delta, check_integer, check_number, check_text

__all__ = ["ClientLevelEntry", "ClientRoundEntry", "DeclineEntry"]


def _release(value: object) -> str:
    """Validate what a client released: ``"train"`` or ``"evaluate"``."""
    if value not in ("train", "evaluate"):
        raise ConfigError(f"release must be 'train' or 'evaluate', got {value!r}")
    return str(value)


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

    @classmethod
    def checked(
        cls,
        *,
        server_round: object,
        client: object,
        epsilon: object,
        delta: object,
        noise_multiplier: object,
        sample_rate: object,
        steps: object,
        release: object = "train",
    ) -> ClientRoundEntry:
        """A validated entry; numbers are normalised to float.

        Raises:
            ConfigError: If a field is invalid.
        """
        entry = cls(
            server_round=check_integer("server_round", server_round, low=0),
            client=check_text("client", client),
            epsilon=check_number("epsilon", epsilon, low=0.0, low_open=False, allow_inf=True),
            delta=check_delta(delta),
            noise_multiplier=check_number(
                "noise_multiplier", noise_multiplier, low=0.0, low_open=True, allow_inf=False
            ),
            sample_rate=check_number(
                "sample_rate", sample_rate, low=0.0, low_open=True, allow_inf=False
            ),
            steps=check_integer("steps", steps, low=1),
            release=_release(release),
        )
        if entry.sample_rate > 1.0:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        return entry


@dataclass(frozen=True)
class DeclineEntry:
    """A client that was asked to train but declined (e.g. its privacy budget is spent)."""

    server_round: int
    client: str
    reason: str

    @classmethod
    def checked(cls, *, server_round: object, client: object, reason: object) -> DeclineEntry:
        """A validated entry (``reason`` may be empty).

        Raises:
            ConfigError: If a field is invalid.
        """
        if not isinstance(reason, str):
            raise ConfigError(f"reason must be a string, got {reason!r}")
        return cls(
            server_round=check_integer("server_round", server_round, low=0),
            client=check_text("client", client),
            reason=reason,
        )


@dataclass(frozen=True)
class ClientLevelEntry:
    """The server's client-level epsilon after one round's release, cumulative, for the
    worst-placed client (see :mod:`pollinate.privacy.client_level`).

    ``epsilon`` is the reported one, the tighter of ``epsilon_rdp`` and ``epsilon_pld``;
    ``sensitivity`` is the worst client's ``||C u||`` so far (in clips); ``clients`` are the
    keys of the clients whose updates the release summed (none under Poisson sampling, whose
    ``sample_rate`` is then > 0); ``count_noise`` is the std of adaptive clipping's noised
    count (``noise_multiplier`` is then the joint one of update and count).
    """

    server_round: int
    epsilon: float
    delta: float
    noise_multiplier: float
    clipping_norm: float
    num_sampled: int
    population: int
    accounting: str
    mechanism: str = "server-fixed"
    epsilon_rdp: float | None = None
    epsilon_pld: float | None = None
    sensitivity: float | None = None
    bands: int = 1
    horizon: int = 0
    clients: tuple[str, ...] = ()
    sample_rate: float = 0.0
    count_noise: float = 0.0

    @classmethod
    def checked(
        cls,
        *,
        server_round: object,
        epsilon: object,
        delta: object,
        noise_multiplier: object,
        clipping_norm: object,
        num_sampled: object,
        population: object,
        accounting: object,
        mechanism: object = "server-fixed",
        epsilon_rdp: object = None,
        epsilon_pld: object = None,
        sensitivity: object = None,
        bands: object = 1,
        horizon: object = 0,
        clients: object = (),
        sample_rate: object = 0.0,
        count_noise: object = 0.0,
    ) -> ClientLevelEntry:
        """A validated entry; numbers are normalised to float.

        Raises:
            ConfigError: If a field is invalid or more clients were sampled than exist.
        """

        def optional(name: str, value: object) -> float | None:
            if value is None:
                return None
            return check_number(name, value, low=0.0, low_open=False, allow_inf=True)

        if not isinstance(clients, list | tuple):
            raise ConfigError(f"clients must be a list of client keys, got {clients!r}")
        entry = cls(
            server_round=check_integer("server_round", server_round, low=0),
            epsilon=check_number("epsilon", epsilon, low=0.0, low_open=False, allow_inf=True),
            delta=check_delta(delta),
            noise_multiplier=check_number(
                "noise_multiplier", noise_multiplier, low=0.0, low_open=False, allow_inf=False
            ),
            clipping_norm=check_number(
                "clipping_norm", clipping_norm, low=0.0, low_open=True, allow_inf=False
            ),
            num_sampled=check_integer("num_sampled", num_sampled, low=1),
            population=check_integer("population", population, low=1),
            accounting=check_text("accounting", accounting),
            mechanism=check_text("mechanism", mechanism),
            epsilon_rdp=optional("epsilon_rdp", epsilon_rdp),
            epsilon_pld=optional("epsilon_pld", epsilon_pld),
            sensitivity=optional("sensitivity", sensitivity),
            bands=check_integer("bands", bands, low=1),
            horizon=check_integer("horizon", horizon, low=0),
            clients=tuple(check_text("client", c) for c in clients),
            sample_rate=check_number(
                "sample_rate", sample_rate, low=0.0, low_open=False, allow_inf=False
            ),
            count_noise=check_number(
                "count_noise", count_noise, low=0.0, low_open=False, allow_inf=False
            ),
        )
        if entry.num_sampled > entry.population:
            raise ConfigError(
                f"num_sampled ({entry.num_sampled}) exceeds population ({entry.population})"
            )
        if len(entry.clients) > entry.num_sampled:
            raise ConfigError(
                f"{len(entry.clients)} clients in a release of a cohort of {entry.num_sampled}"
            )
        return entry
