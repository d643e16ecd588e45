"""Summary statistics of the privacy ledger: the ``summary`` block of ``privacy.json``.

The two guarantees are summarised side by side and never added: sample-level (each client's
latest cumulative DP-SGD epsilon; max, median and mean over the clients that trained) and
client-level (the server's latest DP-FedAvg release). The fixed texts every summary carries
(:data:`NOTE`, :data:`SECURE_NOISE`, :data:`ADJACENCY`) live here too.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from pollinate.privacy.ledger_entries import ClientLevelEntry, ClientRoundEntry

__all__ = [
    "ADJACENCY",
    "NOTE",
    "NOT_PRIVATE",
    "SECURE_NOISE",
    "client_level_summary",
    "ledger_summary",
    "max_and_median",
    "sample_level_summary",
]

NOTE = "sample-level and client-level epsilon are separate guarantees and are never added"
#: What the ledger says of a run whose DP noise came from the seed (tests only).
NOT_PRIVATE = "NOT PRIVATE: reproducible test noise (anyone with the seed can remove it)"
SECURE_NOISE = (
    "secure: DP sampling and noise from the operating system's CSPRNG (os.urandom), "
    "floating-point-safe Gaussian sampler; the run seed does not fix them"
)
ADJACENCY = {
    "sample_level": "add/remove one example of one client's data (Poisson-sampled Gaussian, "
    "RDP); the number of batches per epoch, which sets the sample rate, is public",
    "client_level": "add/remove one client: all its updates in the whole run (Gaussian "
    "matrix mechanism, no sampling amplification)",
}


def max_and_median(
    latest: Mapping[str, ClientRoundEntry],
) -> tuple[float | None, float | None]:
    """The largest and the median of the clients' latest epsilons (``None`` for none)."""
    epsilons = [entry.epsilon for entry in latest.values()]
    if not epsilons:
        return None, None
    return max(epsilons), float(statistics.median(epsilons))


def sample_level_summary(
    *,
    enabled: bool,
    entries: Sequence[ClientRoundEntry],
    latest: Mapping[str, ClientRoundEntry],
    declines: int,
) -> dict[str, object]:
    """The ``sample_level`` block: ``latest`` maps each client to its latest entry."""
    epsilons = [entry.epsilon for entry in latest.values()]
    top, median = max_and_median(latest)
    steps_per_client: dict[str, int] = {}
    for entry in entries:
        steps_per_client[entry.client] = steps_per_client.get(entry.client, 0) + entry.steps
    noises = sorted({entry.noise_multiplier for entry in entries})
    rates = [entry.sample_rate for entry in entries]
    round_steps = [entry.steps for entry in entries]
    mechanism: dict[str, object] = {
        "accounting": "rdp",
        "noise_multiplier": noises[0] if len(noises) == 1 else None,
        "noise_multipliers": [noises[0], noises[-1]] if noises else None,
        "sample_rates": [min(rates), max(rates)] if rates else None,
        "steps_per_round": [min(round_steps), max(round_steps)] if round_steps else None,
    }
    return {
        "enabled": enabled,
        "clients": len(epsilons),
        "max_epsilon": top,
        "median_epsilon": median,
        "mean_epsilon": float(statistics.fmean(epsilons)) if epsilons else None,
        "total_steps_max": max(steps_per_client.values()) if steps_per_client else 0,
        "mechanism": mechanism,
        "declines": declines,
    }


def client_level_summary(
    *, enabled: bool, releases: Sequence[ClientLevelEntry]
) -> dict[str, object]:
    """The ``client_level`` block: the latest release (cumulative), or ``None`` fields."""
    last = releases[-1] if releases else None
    return {
        "enabled": enabled,
        "epsilon": last.epsilon if last else None,
        "delta": last.delta if last else None,
        "noise_multiplier": last.noise_multiplier if last else None,
        "clipping_norm": last.clipping_norm if last else None,
        "num_sampled": last.num_sampled if last else None,
        "population": last.population if last else None,
        "releases": len(releases),
        "accounting": last.accounting if last else None,
        "mechanism": last.mechanism if last else None,
        "epsilon_rdp": last.epsilon_rdp if last else None,
        "epsilon_pld": last.epsilon_pld if last else None,
        "sensitivity": last.sensitivity if last else None,
        "bands": last.bands if last else None,
        "sample_rate": last.sample_rate if last else None,
        "clients": len({c for r in releases for c in r.clients}),
    }


def ledger_summary(
    *,
    delta: float,
    reproducible_noise: bool,
    sample_level: Mapping[str, object],
    client_level: Mapping[str, object],
) -> dict[str, object]:
    """The whole summary: the two blocks side by side, with the fixed texts."""
    return {
        "delta": delta,
        "private": not reproducible_noise,
        "noise": NOT_PRIVATE if reproducible_noise else SECURE_NOISE,
        "adjacency": ADJACENCY,
        "sample_level": sample_level,
        "client_level": client_level,
        "note": NOTE,
    }
