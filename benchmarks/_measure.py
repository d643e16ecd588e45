"""The benchmarks' one measurement helper: timing, ratios against baselines, JSON results.

* Timing: :func:`time_calls` / :func:`time_call` (repeats after a warm-up; several callables
  are interleaved, so drift of the machine hits them alike), :class:`Timings` (median,
  percentiles) and :class:`Stopwatch` (one elapsed time).
* pollinate runs: :func:`run_pollinate` (a ``python -m pollinate`` command, the peak RSS of
  its process tree and the time of its first checkpoint).
* Results: :func:`ratio` / :func:`maybe_ratio` (a value over its baseline, rounded),
  :func:`write_json` / :func:`write_result` (written atomically with
  :func:`pollinate._atomic.atomic_write_text`, then printed) and :func:`print_json`.

Process machinery (running commands, sampling process trees, stopping process groups) is the
tests' harness, :mod:`tests.support`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import REPO
from tests.support.commands import run_command

__all__ = [
    "REPO",
    "RESULTS",
    "Run",
    "Stopwatch",
    "Timings",
    "maybe_ratio",
    "print_json",
    "ratio",
    "run_pollinate",
    "time_call",
    "time_calls",
    "write_json",
    "write_result",
]

RESULTS = REPO / "benchmarks" / "results"
"""Where the benchmarks' JSON results go."""


# ---------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timings:
    """Seconds taken by repeated calls of one thing."""

    seconds: tuple[float, ...]

    def median_s(self, digits: int | None = None) -> float:
        """The median, in seconds (rounded to ``digits`` when given)."""
        median = statistics.median(self.seconds)
        return median if digits is None else round(median, digits)

    def mean_s(self, digits: int | None = None) -> float:
        """The mean, in seconds (rounded to ``digits`` when given)."""
        mean = statistics.fmean(self.seconds)
        return mean if digits is None else round(mean, digits)

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile (numpy's linear interpolation), in milliseconds."""
        import numpy as np

        return float(np.percentile([s * 1000 for s in self.seconds], q))


def time_calls(
    calls: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 0
) -> dict[str, Timings]:
    """Time each of ``calls`` ``repeats`` times, after ``warmup`` untimed rounds.

    Rounds are interleaved (every callable once per round, in order), so that a change of the
    machine's speed during the measurement hits all of them alike.
    """
    for _ in range(warmup):  # allocator, caches, kernels
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - start)
    return {label: Timings(tuple(t)) for label, t in times.items()}


def time_call(call: Callable[[], object], repeats: int, *, warmup: int = 0) -> Timings:
    """Time ``call`` ``repeats`` times, after ``warmup`` untimed calls."""
    return time_calls({"call": call}, repeats, warmup=warmup)["call"]


class Stopwatch:
    """Seconds since it was started (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self, digits: int | None = None) -> float:
        """Seconds elapsed so far (rounded to ``digits`` when given)."""
        elapsed = time.perf_counter() - self.started
        return elapsed if digits is None else round(elapsed, digits)


# ---------------------------------------------------------------------- pollinate runs
@dataclass
class Run:
    """A finished command with its timing and memory."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    first_round_s: float | None
    stderr_tail: str


def run_pollinate(args: Sequence[str], run_dir: Path, *, timeout: float = 1800) -> Run:
    """Run ``python -m pollinate ARGS``, sampling tree RSS and the first checkpoint's time."""
    first_round: list[float] = []
    first = run_dir / "checkpoints" / "round-0001"

    def watch(elapsed: float) -> None:
        if not first_round and first.exists():
            first_round.append(elapsed)

    run = run_command(
        [sys.executable, "-m", "pollinate", *args],
        env_extra={
            "FLWR_HOME": str(run_dir.parent / ".flwr"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": "1",
            "POLLINATE_TRACKING": "off",  # the engine is measured, not MLflow (on by default)
        },
        timeout=timeout,
        on_poll=watch,
    )
    return Run(
        returncode=run.returncode,
        wall_s=run.wall_s,
        peak_rss_mb=run.peak_rss_mb,
        first_round_s=first_round[0] if first_round else None,
        stderr_tail=run.stderr_tail[-2000:],
    )


# ---------------------------------------------------------------------- results
def ratio(value: float, baseline: float, digits: int | None = None) -> float:
    """``value / baseline``, rounded to ``digits`` when given."""
    quotient = value / baseline
    return quotient if digits is None else round(quotient, digits)


def maybe_ratio(
    value: float | None, baseline: float | None, digits: int | None = None
) -> float | None:
    """:func:`ratio`, or None when either is missing or the baseline is 0."""
    if value is None or not baseline:
        return None
    return ratio(value, baseline, digits)


def print_json(result: Mapping[str, Any], *, sort_keys: bool = False) -> str:
    """Print ``result`` as indented JSON; the text printed."""
    text = json.dumps(result, indent=2, sort_keys=sort_keys)
    print(text)
    return text


def write_json(out: Path, result: Mapping[str, Any], *, sort_keys: bool = False) -> Path:
    """Write ``result`` to ``out`` atomically (temp file + rename) and print the JSON."""
    from pollinate._atomic import atomic_write_text

    text = json.dumps(result, indent=2, sort_keys=sort_keys)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text + "\n")
    print(text)
    return out


def json_out(out: Path, default: Path) -> Path:
    """Where ``--out`` writes: a folder gets the default file name inside it (checked when the
    arguments are read, not after the measurement)."""
    return out / default.name if out.is_dir() else out


def write_result(name: str, result: Mapping[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` (keys sorted) and print the JSON."""
    return write_json(RESULTS / f"{name}.json", result, sort_keys=True)
