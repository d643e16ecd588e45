"""The privacy ledger's database: append-only per round, read back exactly, truncated on
resume, never torn by a crash, and a clear error for a file it cannot use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pollinate.errors import ConfigError
from pollinate.privacy import PrivacyLedger
from pollinate.privacy.ledger_store import LedgerStore

COHORT = 50


def _round(ledger: PrivacyLedger, rnd: int, clients: range) -> None:
    for c in clients:
        ledger.record_client(
            server_round=rnd, client=f"p{c:06d}", epsilon=0.1 * rnd + c * 1e-6, delta=1e-5,
            noise_multiplier=1.1, sample_rate=0.25, steps=4,
        )  # fmt: skip
    ledger.record_decline(server_round=rnd, client="p999999", reason="budget")
    ledger.record_client_level(
        server_round=rnd, epsilon=0.5 * rnd, delta=1e-5, noise_multiplier=1.0,
        clipping_norm=1.0, num_sampled=len(clients), population=10**6,
        accounting="rdp", clients=[f"p{c:06d}" for c in clients],
    )  # fmt: skip


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(delta=1e-5, sample_level=True, client_level=True)


def test_rounds_append_only_their_rows_and_read_back_as_the_ledger(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "ledger.sqlite")
    ledger = _ledger()
    store.create(ledger.settings())
    growth = []
    for rnd in range(1, 21):
        before = store.size()
        # a different cohort every round, as sampling from a large population gives
        _round(ledger, rnd, range(rnd * COHORT, (rnd + 1) * COHORT))
        ledger.flush(store)
        growth.append(store.size() - before)
        ledger.flush(store)  # nothing new: nothing written
    # what a round writes follows its cohort, not the history before it
    assert max(growth[10:]) <= 2 * max(growth[:5])
    back = PrivacyLedger.from_store(store)
    assert back.to_dict() == ledger.to_dict()
    assert back.clients_seen() == ledger.clients_seen()
    assert [e.server_round for e in store.client_history("p000050")] == [1]

    store.truncate_after(12)
    ledger.truncate_after(12)
    assert PrivacyLedger.from_store(store).to_dict() == ledger.to_dict()
    _round(ledger, 13, range(5))  # the resumed round 13 goes in after the truncation
    ledger.flush(store)
    assert PrivacyLedger.from_store(store).to_dict() == ledger.to_dict()


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_ledger_store import _ledger, _round
    from pollinate.privacy.ledger_store import LedgerStore

    store = LedgerStore(Path({path!r}))
    ledger = _ledger()
    store.create(ledger.settings())
    print("ready", flush=True)
    rnd = 0
    while True:
        rnd += 1
        _round(ledger, rnd, range({cohort}))
        ledger.flush(store)
    """
)


def test_a_process_killed_while_writing_leaves_whole_rounds(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    code = _WRITER.format(tests=str(Path(__file__).parent), path=str(path), cohort=COHORT)
    for delay in (0.3, 0.7):
        with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as child:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        ledger = PrivacyLedger.from_store(LedgerStore(path))  # replays every check
        rounds = [e.server_round for e in ledger.entries]
        last = max(rounds)
        assert last >= 1
        # every committed round is whole: its cohort, its decline and its release
        assert sorted(rounds) == [r for r in range(1, last + 1) for _ in range(COHORT)]
        assert [r.server_round for r in ledger.releases] == list(range(1, last + 1))
        assert len(ledger.declines) == last


def test_a_file_that_is_not_a_ledger_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "ledger.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match=r"ledger\.sqlite"):
        PrivacyLedger.from_store(LedgerStore(bad))
    with pytest.raises(ConfigError, match="missing"):
        LedgerStore(tmp_path / "none.sqlite").load()
    store = LedgerStore(tmp_path / "other.sqlite")
    store.create(_ledger().settings())
    import sqlite3

    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (json.dumps(99),))
    with pytest.raises(ConfigError, match="unsupported version 99"):
        PrivacyLedger.from_store(store)
