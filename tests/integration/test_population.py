"""A million simulated clients through the CLI, 100 a round: a client sampled in rounds 1 and
4 keeps one accountant across them, and a run killed mid-round resumes to the ledger of the
run that was never interrupted.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pollinate.clientapp.training import seed_for
from pollinate.config import RunSettings
from pollinate.privacy import ClientAccountant, PrivacyLedger
from pollinate.privacy.ledger_entries import ClientRoundEntry
from pollinate.privacy.ledger_store import LEDGER_FILE, LedgerStore
from pollinate.protocol import partition_key
from pollinate.serverapp.population import PartitionRange
from pollinate.simulation.local_grid import JOURNAL_NAME, read_journal
from tests.support.simulation import simulate, simulate_and_kill

pytestmark = pytest.mark.slow

CLIENTS, ROUNDS, FRACTION = 1_000_000, 5, 0.0001


def _args(seed: int) -> tuple[str, ...]:
    return ("--num-clients", str(CLIENTS), "--rounds", str(ROUNDS), "--seed", str(seed),
            "--fraction", str(FRACTION), "--partitioner", "resample",
            "--set", "samples-per-client=4", "--engine", "fast")  # fmt: skip


def _seed_with_a_client_in_rounds_1_and_4() -> tuple[int, str]:
    """A seed whose round 1 and round 4 share a client (as the server samples, from the
    seed: about one seed in a hundred at 100 of a million)."""
    size = RunSettings.from_run_config({"fraction-train": FRACTION}).sample_size(CLIENTS)
    population = PartitionRange(0, CLIENTS)
    for seed in range(5000):
        one, four = (
            set(population.sample(size, np.random.default_rng(seed_for(seed, rnd, 13))))
            for rnd in (1, 4)
        )
        if one & four:
            return seed, partition_key(min(one & four))
    raise AssertionError("no seed below 5000 samples a client twice")


def _rows(run_dir: Path) -> list[ClientRoundEntry]:
    return list(PrivacyLedger.from_store(LedgerStore(run_dir / LEDGER_FILE)).entries)


def test_a_million_clients_one_accountant_per_client_and_a_resume_loses_nothing(
    tmp_path: Path,
) -> None:
    seed, twice = _seed_with_a_client_in_rounds_1_and_4()
    full = tmp_path / "full"
    proc = simulate(tmp_path, *_args(seed), "--run-dir", str(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(full)
    by_round = defaultdict(set)
    for row in rows:
        by_round[row.server_round].add(row.client)
    assert sorted(by_round) == list(range(1, ROUNDS + 1))
    assert all(len(clients) == 100 for clients in by_round.values())

    # the client of rounds 1 and 4: one accountant, both rounds composed in it
    mine = [r for r in rows if r.client == twice]
    assert [r.server_round for r in mine] == [1, 4]
    assert mine[1].epsilon > mine[0].epsilon
    journal = read_journal(full / "clients" / JOURNAL_NAME)
    accountant = ClientAccountant.from_record(journal[twice])
    assert accountant.total_steps == mine[0].steps + mine[1].steps
    assert accountant.epsilon(mine[1].delta) == pytest.approx(mine[1].epsilon, rel=1e-9)
    # only the sampled clients have state: nothing was built for the other 999,5xx
    assert len(journal) == len({r.client for r in rows}) < 500

    killed = tmp_path / "killed"
    last = simulate_and_kill(tmp_path, killed, *_args(seed))
    assert 2 <= last < ROUNDS
    proc = simulate(tmp_path, "--resume", str(killed))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the same releases by the same clients in the same rounds; a round the crash cut still
    # counts against the clients that trained in it, so their epsilon may only be higher
    resumed = _rows(killed)
    assert [(r.server_round, r.client, r.release, r.steps) for r in resumed] == [
        (r.server_round, r.client, r.release, r.steps) for r in rows
    ]
    cut = by_round[last + 1]
    for a, b in zip(rows, resumed, strict=True):
        if a.client in cut:
            assert b.epsilon >= a.epsilon - 1e-12
        else:
            assert b.epsilon == pytest.approx(a.epsilon, rel=1e-12)
