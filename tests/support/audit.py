"""The privacy audit's computation: a run's privacy ledger recomputed with Google's
``dp-accounting``, and the one-run audit's lower bound on epsilon.

Recomputation: every epsilon of a ledger (RUN_DIR/privacy.json) is computed again,

* sample-level: client c after round r is the composition of all of c's rounds up to r, each
  ``steps`` self-compositions of ``PoissonSampledDpEvent(sample_rate,
  GaussianDpEvent(noise_multiplier))``, add/remove-one, at the entry's delta;
* client-level (a Gaussian matrix mechanism, no amplification): each client's rounds are
  rebuilt from the releases' ``clients`` lists; its whole run is one
  ``GaussianDpEvent(noise_multiplier / ||C u||)`` with the strategy matrix ``C`` built by hand
  (:func:`hand_strategy_matrix`: identity, binary tree or banded square root), and a release's
  epsilon is the worst client's;

each with ``RdpAccountant`` at Opacus' orders, at dp-accounting's own default orders, and with
``PLDAccountant`` (tighter: expect reported >= PLD). An epsilon more than
:data:`PLD_TOLERANCE` below its PLD value is an under-report (:func:`summarize` counts them).

Bound (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run"):
:func:`epsilon_lower_bound` turns the correct guesses about randomly included canaries into
a lower bound on the epsilon of the training.

Used by ``tests/unit/test_privacy_audit.py`` and by the privacy-audit benchmark (which runs
the simulations and the canary training).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# An epsilon this far (relative) below dp-accounting's PLD value counts as an under-report.
PLD_TOLERANCE = 1e-3
# PLD grid: the default of dp-accounting (pessimistic estimate, an upper bound on epsilon).
PLD_DISCRETIZATION = 1e-4

# --------------------------------------------------------------------------- ledger reading


class LedgerFormatError(ValueError):
    """privacy.json lacks a key the audit needs, or holds a value of the wrong kind."""


def _field(entry: Mapping[str, Any], key: str, where: str) -> Any:
    """``entry[key]``, or a :class:`LedgerFormatError` naming the missing key and where."""
    if not isinstance(entry, Mapping):
        raise LedgerFormatError(f"{where} must be a JSON object, got {type(entry).__name__}")
    if key not in entry:
        present = ", ".join(sorted(map(str, entry))) or "none"
        raise LedgerFormatError(f"{where} is missing the key {key!r} (keys present: {present})")
    return entry[key]


def _number(entry: Mapping[str, Any], key: str, where: str) -> float:
    """``entry[key]`` as a float (a number, not a bool)."""
    value = _field(entry, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LedgerFormatError(f"{where}[{key!r}] must be a number, got {value!r}")
    return float(value)


def _integer(entry: Mapping[str, Any], key: str, where: str) -> int:
    """``entry[key]``, an integer (not a bool)."""
    value = _field(entry, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerFormatError(f"{where}[{key!r}] must be an integer, got {value!r}")
    return value


def entries(ledger: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """The list ``ledger[key]`` (a :class:`LedgerFormatError` when it is missing or no list)."""
    items = _field(ledger, key, "ledger")
    if not isinstance(items, list):
        raise LedgerFormatError(f"ledger[{key!r}] must be a list, got {type(items).__name__}")
    return items


def read_ledger(path: Path) -> dict[str, Any]:
    """The ``ledger`` part of a run's privacy.json (``{"summary": ..., "ledger": ...}``)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LedgerFormatError(f"cannot read {path}: {exc}") from exc
    ledger = _field(document, "ledger", str(path))
    if not isinstance(ledger, dict):
        raise LedgerFormatError(f"{path}: 'ledger' must be a JSON object")
    return ledger


# --------------------------------------------------------------------------- recomputation


@dataclass(frozen=True)
class Recomputed:
    """One ledger epsilon and dp-accounting's three values for the same mechanism."""

    unit: str  # "sample" or "client"
    key: str  # client id (sample-level) or "server" (client-level)
    server_round: int
    reported: float
    rdp_opacus_orders: float
    rdp_default_orders: float
    pld: float
    #: sample-level, every round at sample rate 1: pollinate reports the exact Gaussian epsilon
    full_batch: bool = False

    @property
    def own(self) -> float:
        """What pollinate's own accountant reports for this mechanism: the tighter of RDP and
        PLD (client-level; a full-batch sample-level history, where it is the exact Gaussian
        epsilon), or Opacus' RDP (a subsampled sample-level history)."""
        if self.unit == "client" or self.full_batch:
            return min(self.rdp_opacus_orders, self.pld)
        return self.rdp_opacus_orders


def _quiet_dp_accounting() -> None:
    # dp-accounting logs (through absl) every fractional order its series gives up on.
    logging.getLogger("absl").setLevel(logging.ERROR)


@functools.cache
def opacus_orders() -> tuple[float, ...]:
    """The RDP orders of Opacus' RDPAccountant."""
    from opacus.accountants import RDPAccountant

    return tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)


def _epsilons(event: Any, delta: float) -> tuple[float, float, float]:
    """(RDP at Opacus' orders, RDP at dp-accounting's orders, PLD) epsilon of ``event``."""
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    _quiet_dp_accounting()
    rdp_opacus = RdpAccountant(orders=list(opacus_orders())).compose(event).get_epsilon(delta)
    rdp_default = RdpAccountant().compose(event).get_epsilon(delta)
    pld = (
        PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        .compose(event)
        .get_epsilon(delta)
    )
    return float(rdp_opacus), float(rdp_default), float(pld)


@functools.lru_cache(maxsize=1024)
def sample_level_epsilons(
    history: tuple[tuple[float, float, int], ...], delta: float
) -> tuple[float, float, float]:
    """dp-accounting's epsilons of DP-SGD rounds ``(noise_multiplier, sample_rate, steps)``."""
    from dp_accounting import dp_event

    event = dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise)), steps
            )
            for noise, rate, steps in history
        ]
    )
    return _epsilons(event, delta)


@functools.lru_cache(maxsize=1024)
def client_level_epsilons(noises: tuple[float, ...], delta: float) -> tuple[float, float, float]:
    """dp-accounting's epsilons of Gaussian releases (no amplification), one per round."""
    from dp_accounting import dp_event

    if any(noise <= 0 for noise in noises):
        return math.inf, math.inf, math.inf
    event = dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(noise) for noise in noises])
    return _epsilons(event, delta)


def recompute_sample_level(ledger: Mapping[str, Any]) -> list[Recomputed]:
    """Every sample-level epsilon of ``ledger`` (its ``clients`` list), recomputed."""
    run_delta = _number(ledger, "delta", "ledger")
    histories: dict[str, list[tuple[int, tuple[float, float, int]]]] = {}
    out: list[Recomputed] = []
    rows = []
    for i, entry in enumerate(entries(ledger, "clients")):
        where = f"ledger['clients'][{i}]"
        client = str(_field(entry, "client", where))
        rnd = _integer(entry, "server_round", where)
        block = (
            _number(entry, "noise_multiplier", where),
            _number(entry, "sample_rate", where),
            _integer(entry, "steps", where),
        )
        delta = _number(entry, "delta", where) if "delta" in entry else run_delta
        rows.append((client, rnd, block, delta, _number(entry, "epsilon", where)))
    # Per client in round order (the ledger records them so; sorting makes it certain).
    for client, rnd, block, delta, reported in sorted(rows, key=lambda row: (row[0], row[1])):
        history = histories.setdefault(client, [])
        history.append((rnd, block))
        blocks = tuple(b for _, b in history)
        rdp_o, rdp_d, pld = sample_level_epsilons(blocks, delta)
        full = all(rate == 1.0 for _, rate, _ in blocks)
        out.append(Recomputed("sample", client, rnd, reported, rdp_o, rdp_d, pld, full))
    return out


def hand_strategy_matrix(mechanism: str, horizon: int, bands: int) -> np.ndarray:
    """The strategy matrix ``C`` built by hand, independently of pollinate: rows are the
    released noise vectors, columns the rounds.

    * fixed or adaptive clipping: the identity;
    * ``ftrl-tree``: one row per node of the binary tree over rounds ``1..horizon`` that some
      prefix ``1..t`` (t <= horizon) uses: the nodes of length 2^l ending at a multiple ``t``
      of 2^l whose bit l is set, i.e. intervals ``(t - 2^l, t]``;
    * ``ftrl-banded``: ``C[i, j] = binom(2(i-j), i-j) / 4^(i-j)`` for ``0 <= i - j < bands``.
    """
    if mechanism == "ftrl-tree":
        intervals = set()
        for t in range(1, horizon + 1):
            end, rest = 0, t
            for level in reversed(range(t.bit_length())):
                if rest >= 2**level:
                    intervals.add((end, end + 2**level))
                    end += 2**level
                    rest -= 2**level
        rows = []
        for start, stop in sorted(intervals):
            row = np.zeros(horizon)
            row[start:stop] = 1.0
            rows.append(row)
        return np.array(rows)
    out = np.zeros((horizon, horizon))
    for i in range(horizon):
        for j in range(horizon):
            lag = i - j
            if mechanism == "ftrl-banded":
                if 0 <= lag < bands:
                    out[i, j] = math.comb(2 * lag, lag) / 4**lag
            elif lag == 0:
                out[i, j] = 1.0
    return out


@functools.lru_cache(maxsize=1024)
def gaussian_epsilons(noise: float, delta: float) -> tuple[float, float, float]:
    """dp-accounting's epsilons of one Gaussian mechanism of noise multiplier ``noise``."""
    from dp_accounting import dp_event

    if noise <= 0:
        return math.inf, math.inf, math.inf
    return _epsilons(dp_event.GaussianDpEvent(noise), delta)


@functools.lru_cache(maxsize=1024)
def amplified_epsilons(
    noise: float, rate: float, releases: int, delta: float
) -> tuple[float, float, float]:
    """dp-accounting's epsilons of ``releases`` Poisson-subsampled Gaussian releases."""
    from dp_accounting import dp_event

    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise)), releases
    )
    return _epsilons(event, delta)


def recompute_client_level(ledger: Mapping[str, Any]) -> list[Recomputed]:
    """Every client-level epsilon of ``ledger`` (its ``client_level_releases``), recomputed.

    Each client's history is rebuilt from the releases' ``clients`` lists; its whole run is
    one Gaussian mechanism of sensitivity ``||C u||`` (``u``: the rounds it contributed to,
    ``C`` from :func:`hand_strategy_matrix`); the release's epsilon is the worst client's.
    A ledger without ``clients`` (before per-client accounting) composes one Gaussian per
    release, every release counted against every client.
    """
    run_delta = _number(ledger, "delta", "ledger")
    releases = sorted(
        entries(ledger, "client_level_releases"), key=lambda e: int(e.get("server_round", 0))
    )
    out: list[Recomputed] = []
    noises: list[float] = []
    history: dict[str, list[int]] = {}
    for i, entry in enumerate(releases):
        where = f"ledger['client_level_releases'][{i}]"
        rnd = _integer(entry, "server_round", where)
        noise = _number(entry, "noise_multiplier", where)
        delta = _number(entry, "delta", where) if "delta" in entry else run_delta
        reported = _number(entry, "epsilon", where)
        rate = float(entry.get("sample_rate", 0.0))
        if rate > 0:  # Poisson cohorts from secret coins: every client, every release so far
            rdp_o, rdp_d, pld = amplified_epsilons(noise, rate, i + 1, delta)
            out.append(Recomputed("client", "server", rnd, reported, rdp_o, rdp_d, pld))
            continue
        if "clients" not in entry:
            noises.append(noise)
            rdp_o, rdp_d, pld = client_level_epsilons(tuple(noises), delta)
            out.append(Recomputed("client", "server", rnd, reported, rdp_o, rdp_d, pld))
            continue
        for client in entry["clients"]:
            history.setdefault(str(client), []).append(rnd)
        horizon = _integer(entry, "horizon", where)
        matrix = hand_strategy_matrix(
            str(entry.get("mechanism")), horizon, _integer(entry, "bands", where)
        )
        worst = 0.0
        for rounds in history.values():
            u = np.zeros(horizon)
            u[[r - 1 for r in rounds]] = 1.0
            worst = max(worst, float(np.linalg.norm(matrix @ u)))
        if worst == 0:
            out.append(Recomputed("client", "server", rnd, reported, 0.0, 0.0, 0.0))
            continue
        rdp_o, rdp_d, pld = gaussian_epsilons(noise / worst, delta)
        out.append(Recomputed("client", "server", rnd, reported, rdp_o, rdp_d, pld))
    return out


def rel_diff(ours: float, theirs: float) -> float:
    """``|ours - theirs| / theirs`` (0 when both are equal, inf when only ``theirs`` is 0)."""
    if ours == theirs:
        return 0.0
    if theirs == 0 or math.isinf(theirs) or math.isinf(ours):
        return math.inf
    return abs(ours - theirs) / abs(theirs)


def finite(value: float) -> float | str:
    """``value``, or its string ("inf", "nan") when it is not finite: JSON has no inf."""
    return value if math.isfinite(value) else str(value)


def summarize(records: Sequence[Recomputed]) -> dict[str, Any]:
    """Counts, maximum relative differences, reported/PLD ratios and under-reports."""
    if not records:
        return {"epsilons_checked": 0}
    ratios = [r.reported / r.pld if r.pld > 0 else math.inf for r in records]
    under = [r for r in records if r.reported < r.pld * (1 - PLD_TOLERANCE)]
    worst = max(records, key=lambda r: rel_diff(r.rdp_opacus_orders, r.reported))
    return {
        "epsilons_checked": len(records),
        "max_rel_diff_rdp_opacus_orders": finite(
            max(rel_diff(r.rdp_opacus_orders, r.reported) for r in records)
        ),
        "max_rel_diff_rdp_default_orders": finite(
            max(rel_diff(r.rdp_default_orders, r.reported) for r in records)
        ),
        "max_rel_diff_pld": finite(max(rel_diff(r.pld, r.reported) for r in records)),
        "max_rel_diff_own_accountant": finite(max(rel_diff(r.own, r.reported) for r in records)),
        "min_ratio_reported_over_pld": finite(min(ratios)),
        "max_ratio_reported_over_pld": finite(max(ratios)),
        "under_reports_vs_pld": len(under),
        "under_report_examples": [vars(r) for r in under[:3]],
        "max_reported_epsilon": max(r.reported for r in records),
        "worst_rdp_opacus_orders": {
            k: finite(v) if isinstance(v, float) else v for k, v in vars(worst).items()
        },
    }


def _noise_in_run_json(run_dir: Path, unit: str) -> float | None:
    """The noise multiplier run.json says the run used (None when it does not say)."""
    try:
        meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    value = meta.get("noise" if unit == "sample" else "client_noise")
    return float(value) if isinstance(value, int | float) else None


def check_run(run_dir: Path, unit: str) -> tuple[dict[str, Any], list[Recomputed]]:
    """Recompute the epsilons of one finished run; its summary and the records."""
    ledger = read_ledger(run_dir / "privacy.json")
    if unit == "sample":
        records = recompute_sample_level(ledger)
        released = entries(ledger, "clients")
        # DP-SGD rounds only: noised evaluations ("release": "evaluate") have their own noise
        training = [e for e in released if e.get("release", "train") == "train"]
        noises = sorted({float(e["noise_multiplier"]) for e in training})
        evaluations = len(released) - len(training)
    else:
        records = recompute_client_level(ledger)
        noises = sorted(
            {float(e["noise_multiplier"]) for e in entries(ledger, "client_level_releases")}
        )
        evaluations = 0
    if not records:
        raise LedgerFormatError(f"{run_dir / 'privacy.json'}: no {unit}-level entries")
    summary = summarize(records)
    run_noise = _noise_in_run_json(run_dir, unit)
    summary["evaluation_releases"] = evaluations
    summary["ledger_noise_multipliers"] = noises
    summary["run_json_noise_multiplier"] = run_noise
    summary["ledger_noise_matches_run_json"] = (
        None if run_noise is None else all(math.isclose(n, run_noise) for n in noises)
    )
    return summary, records


# --------------------------------------------------------------------------- the bound


def binomial_upper_tail(successes: int, trials: int, p: float) -> float:
    """P[Binomial(trials, p) >= successes], exact (scipy's survival function)."""
    from scipy.stats import binom

    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    return float(binom.sf(successes - 1, trials, p))


def epsilon_lower_bound(correct: int, guesses: int, confidence: float = 0.95) -> float:
    """Steinke, Nasr, Jagielski (2023), delta = 0: a lower bound on epsilon from guesses.

    For an eps-DP training with canaries included independently with probability 1/2, the
    number of correct guesses among ``guesses`` is stochastically dominated by
    Binomial(guesses, e^eps / (1 + e^eps)). The bound is the largest eps with
    P[Binomial(guesses, e^eps / (1 + e^eps)) >= correct] <= 1 - confidence: every smaller
    eps is rejected at that confidence. 0.0 when even eps = 0 cannot be rejected.
    """
    if not 0 <= correct <= guesses:
        raise ValueError(f"need 0 <= correct <= guesses, got {correct} of {guesses}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    if guesses == 0 or binomial_upper_tail(correct, guesses, 0.5) > alpha:
        return 0.0
    # The tail grows with p = e^eps / (1 + e^eps); bisect on p in [1/2, 1).
    low, high = 0.5, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        if binomial_upper_tail(correct, guesses, mid) <= alpha:
            low = mid
        else:
            high = mid
    return math.log(low) - math.log1p(-low)
