"""A/B/n statistics on simulated traffic of known effect: power and false positives under
continuous monitoring, against the fixed-horizon z-test peeked at as often.

Every run simulates two arms (Bernoulli outcomes: an answer right or wrong) that receive
``--batch`` outcomes each between two looks, up to ``--max-per-variant`` each. At every look
the always-valid test of ``pollinate/serving/abtest.py`` (the server's own functions, on whole
arrays) is evaluated, exactly as the server's running minimum would have seen it:

* **power**: control 0.80, challenger 0.82 (a 2-point accuracy gain), ``--runs`` runs;
  ``samples_per_variant`` is the smallest look at which at least 80% of the runs have
  declared the challenger the winner (always-valid p <= alpha, estimate > 0), and ``power``
  the fraction at that look;
* **false_positive_rate**: 1000 A/A runs (0.80 and 0.80) looked at after every batch up to
  the whole horizon (more looks than ``samples_per_variant`` needs): the fraction that ever
  declared a difference;
* **naive_peeking_false_positive_rate** (the baseline): the same A/A paths, judged at every
  look by the two-proportion z-test built for one look at a fixed horizon (|z| >= 1.96);
* **fixed_horizon_samples_per_variant**: the classical sample size of that z-test for 80%
  power at this effect (its price for being valid only at one look, fixed in advance), with
  its simulated power at that n;
* **holm_five_variants_false_positive_rate**: A/A/A/A/A (four challengers against one
  control), Holm-adjusted at every look: the family-wise rate of any false winner or loser;
* **observe_us**: what one outcome costs the server (``SequentialTest.observe``, 4 challengers).

``median_samples_to_winner`` counts runs never decided at the horizon.

Writes benchmarks/results/ab.json (atomically; --out elsewhere) and prints it. About 3 s on
one core.

Usage: python benchmarks/ab.py [--runs 5000] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import RESULTS, Stopwatch, json_out, time_call, write_json
from pollinate.serving.abtest import (
    SequentialTest,
    diff_and_variance,
    holm_adjust,
    running_paths,
)

ALPHA = 0.05
MIXTURE_SD = 0.02  # the server's default: tuned to a 2-point accuracy difference
MIN_SAMPLES = 100  # the server's default
CONTROL, CHALLENGER = 0.80, 0.82
TARGET_POWER = 0.8


def _paths(
    rng: np.random.Generator, rates: list[float], runs: int, looks: int, batch: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-arm cumulative successes at every look, shape (runs, looks); the counts per arm."""
    n = batch * np.arange(1, looks + 1)
    return n, [np.cumsum(rng.binomial(batch, r, (runs, looks)), axis=1) for r in rates]


def _always_valid(n: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> tuple[np.ndarray, ...]:
    d, v = diff_and_variance(n, s0, s0, n, s1, s1)  # 0/1 outcomes: sum of squares = sum
    p, _, _ = running_paths(d, v, n >= MIN_SAMPLES, tau2=MIXTURE_SD**2, alpha=ALPHA)
    return d, v, p


def _power(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    looks = args.max_per_variant // args.batch
    n, (s0, s1) = _paths(rng, [CONTROL, CHALLENGER], args.runs, looks, args.batch)
    d, _, p = _always_valid(n, s0, s1)
    rejected = p <= ALPHA
    first = np.where(rejected.any(axis=1), rejected.argmax(axis=1), looks)
    sign = np.take_along_axis(d, np.minimum(first, looks - 1)[:, None], axis=1)[:, 0]
    winner_at = np.where(sign > 0, first, looks)  # a look index, or `looks`: never a winner
    power = (winner_at[:, None] <= np.arange(looks)[None, :]).mean(axis=0)
    reached = np.flatnonzero(power >= TARGET_POWER)
    at = int(reached[0]) if reached.size else looks - 1
    return {
        "samples_per_variant": int(n[at]),
        "power": round(float(power[at]), 4),
        "power_at_horizon": round(float(power[-1]), 4),
        "wrong_sign_rate": round(float(((first < looks) & (sign < 0)).mean()), 4),
        "median_samples_to_winner": int(n[int(np.median(np.minimum(winner_at, looks - 1)))]),
    }


def _false_positives(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    looks = args.max_per_variant // args.batch
    n, (s0, s1) = _paths(rng, [CONTROL, CONTROL], args.aa_runs, looks, args.batch)
    d, v, p = _always_valid(n, s0, s1)
    z = np.abs(d / np.sqrt(v))
    naive = (z[:, n >= MIN_SAMPLES] >= stats.norm.ppf(1 - ALPHA / 2)).any(axis=1)
    return {
        "false_positive_rate": round(float((p[:, -1] <= ALPHA).mean()), 4),
        "naive_peeking_false_positive_rate": round(float(naive.mean()), 4),
        "naive_single_look_false_positive_rate": round(
            float((z[:, -1] >= stats.norm.ppf(1 - ALPHA / 2)).mean()), 4
        ),
    }


def _fixed_horizon(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    """The classical two-proportion sample size for this effect, and its power simulated."""
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(TARGET_POWER)
    var = CONTROL * (1 - CONTROL) + CHALLENGER * (1 - CHALLENGER)
    n = int(np.ceil(z**2 * var / (CHALLENGER - CONTROL) ** 2))
    s0 = rng.binomial(n, CONTROL, args.runs)
    s1 = rng.binomial(n, CHALLENGER, args.runs)
    d, v = diff_and_variance(n, s0, s0, n, s1, s1)
    power = float((d / np.sqrt(v) >= stats.norm.ppf(1 - ALPHA / 2)).mean())
    return {"fixed_horizon_samples_per_variant": n, "fixed_horizon_power": round(power, 4)}


def _holm_five_variants(args: argparse.Namespace, rng: np.random.Generator) -> float:
    looks = args.max_per_variant // args.batch
    n, arms = _paths(rng, [CONTROL] * 5, args.aa_runs, looks, args.batch)
    p = np.stack([_always_valid(n, arms[0], arm)[2] for arm in arms[1:]], axis=-1)
    adjusted = holm_adjust(p)  # (runs, looks, 4 challengers), at every look
    return round(float((adjusted <= ALPHA).any(axis=(1, 2)).mean()), 4)


def _observe_us() -> float:
    rng = np.random.default_rng(0)
    test = SequentialTest(5, alpha=ALPHA, mixture_sd=MIXTURE_SD, min_samples=MIN_SAMPLES)
    for _ in range(MIN_SAMPLES):  # every arm past the burn-in: each outcome is a real look
        for arm in range(5):
            test.observe(arm, 1.0)
    outcomes = (rng.random(2000) < CONTROL).astype(float)

    def feed() -> None:
        for i, x in enumerate(outcomes):
            test.observe(i % 5, float(x))

    return round(time_call(feed, repeats=5, warmup=1).median_s() / len(outcomes) * 1e6, 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5000, help="A/B runs for the power")
    parser.add_argument("--aa-runs", type=int, default=1000, help="A/A runs")
    parser.add_argument("--batch", type=int, default=100, help="outcomes per arm between looks")
    parser.add_argument("--max-per-variant", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "ab.json")
    args = parser.parse_args()
    args.out = json_out(args.out, RESULTS / "ab.json")
    clock = Stopwatch()
    rng = np.random.default_rng(args.seed)
    result: dict[str, Any] = {
        "alpha": ALPHA, "mixture_sd": MIXTURE_SD, "min_samples": MIN_SAMPLES,
        "control_accuracy": CONTROL, "challenger_accuracy": CHALLENGER,
        "runs": args.runs, "aa_runs": args.aa_runs, "batch_per_look": args.batch,
        "looks": args.max_per_variant // args.batch, "max_per_variant": args.max_per_variant,
        "seed": args.seed,
    }  # fmt: skip
    result |= _power(args, rng)
    result |= _false_positives(args, rng)
    result |= _fixed_horizon(args, rng)
    result["always_valid_cost"] = round(
        result["samples_per_variant"] / result["fixed_horizon_samples_per_variant"], 3
    )
    result["holm_five_variants_false_positive_rate"] = _holm_five_variants(args, rng)
    result["observe_us"] = _observe_us()
    result["wall_s"] = clock.seconds(1)
    write_json(args.out, result, sort_keys=True)


if __name__ == "__main__":
    main()
