"""Cost against population size: 1,000, 100,000 and 1,000,000 simulated clients, 100 a round,
5 rounds, DP-SGD, the fast engine, each run a ``pollinate simulate`` process as a user starts it.

Per population: ``peak_rss_mb`` (the process tree), ``time_to_first_round_s`` (process start
to round 1's checkpoint), ``warm_s_per_round`` (median of rounds 2-5) and
``ledger_bytes_written_per_round``: what the run's ledger writes after each round, measured by
replaying the run's own ledger, round by round, into a fresh database (the rows a round
appends, through the same code; the bytes passed to write(2), log and checkpoint included)
plus the per-round ``privacy.json`` (its summary). The
baseline is this 1,000-client run (``warm_ratio_1m_over_1k``, goal <= 1.5) and, for the ledger,
the format before the database: the whole ledger as JSON, written twice each round
(``privacy.json`` and the checkpoint's ``state.json``), which grows with the history.

    python benchmarks/population.py            # -> benchmarks/results/population.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._measure import maybe_ratio, run_pollinate, write_result
from pollinate.privacy import PrivacyLedger
from pollinate.privacy.ledger_io import to_json
from pollinate.privacy.ledger_store import LEDGER_FILE, LedgerStore

POPULATIONS = (1_000, 100_000, 1_000_000)
PER_ROUND, ROUNDS = 100, 5
GOALS = {"peak_rss_mb_1m": 2000, "time_to_first_round_s_1m": 10, "warm_ratio_1m_over_1k": 1.5}


def ledger_writes(run_dir: Path) -> dict[str, list[int]]:
    """Bytes the ledger writes after each round: now (database rows + summary) and before
    (the whole ledger as JSON, twice), from the run's own ledger replayed round by round."""
    ledger = PrivacyLedger.from_store(LedgerStore(run_dir / LEDGER_FILE))
    summary = len(json.dumps({"summary": ledger.summary(), "ledger_file": LEDGER_FILE}))
    now, before = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = LedgerStore(Path(tmp) / LEDGER_FILE)
        store.create(ledger.settings())
        replay = PrivacyLedger(**ledger.settings())  # type: ignore[arg-type]
        for rnd in range(1, ROUNDS + 1):
            for entry in ledger.entries:
                if entry.server_round == rnd:
                    replay.record_client(**vars(entry))
            for release in ledger.releases:
                if release.server_round == rnd:
                    replay.record_client_level(**vars(release))
            written = _bytes_written()
            replay.flush(store)
            now.append(_bytes_written() - written + summary)
            before.append(2 * len(to_json(replay.to_dict())))
    return {"now": now, "before": before}


def _bytes_written() -> int:
    """Bytes this process has passed to write(2) so far (Linux' /proc/self/io ``wchar``):
    the database's pages, its write-ahead log and the log's checkpoint alike."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def measure(population: int, work: Path) -> dict[str, Any]:
    run_dir = work / f"pop-{population}"
    args = ["simulate", "--num-clients", str(population), "--rounds", str(ROUNDS),
            "--fraction", repr(PER_ROUND / population), "--partitioner", "resample",
            "--set", "samples-per-client=4", "--engine", "fast",
            "--run-dir", str(run_dir)]  # fmt: skip
    run = run_pollinate(args, run_dir)
    if run.returncode != 0:
        raise SystemExit(f"{population} clients failed:\n{run.stderr_tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m["sampled"] for m in metrics[1:]] == [PER_ROUND] * ROUNDS, metrics
    writes = ledger_writes(run_dir)
    return {
        "population": population,
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "time_to_first_round_s": round(run.first_round_s or float("nan"), 2),
        "warm_s_per_round": round(statistics.median(m["seconds"] for m in metrics[2:]), 3),
        "wall_s": round(run.wall_s, 2),
        "ledger_bytes_written_per_round": round(statistics.fmean(writes["now"])),
        "ledger_bytes_by_round": writes["now"],
        "json_ledger_bytes_by_round_before": writes["before"],
        "final_accuracy": metrics[-1]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", type=int, nargs="+", default=list(POPULATIONS))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pollinate-population-") as tmp:
        rows = [measure(n, Path(tmp)) for n in options.populations]
    by = {row["population"]: row for row in rows}
    small, large = by.get(min(by)), by.get(max(by))
    result: dict[str, Any] = {
        "benchmark": "population",
        "engine": "fast",
        "clients_per_round": PER_ROUND,
        "rounds": ROUNDS,
        "runs": rows,
        "goals": GOALS,
        "baseline": f"the {min(by):,}-client run; the ledger as whole JSON each round (before)",
    }
    if small is not None and large is not None:
        result.update(
            peak_rss_mb=large["peak_rss_mb"],
            time_to_first_round_s=large["time_to_first_round_s"],
            warm_s_per_round=large["warm_s_per_round"],
            ledger_bytes_written_per_round=large["ledger_bytes_written_per_round"],
            warm_ratio_1m_over_1k=maybe_ratio(
                large["warm_s_per_round"], small["warm_s_per_round"], 2
            ),
            ledger_write_ratio_round5_before_over_now=maybe_ratio(
                large["json_ledger_bytes_by_round_before"][-1],
                large["ledger_bytes_by_round"][-1],
                1,
            ),
        )
    write_result("population", result)


if __name__ == "__main__":
    main()
