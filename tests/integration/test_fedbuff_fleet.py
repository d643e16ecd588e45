"""``strategy = fedbuff`` on a real federation (SuperLink with TLS and node authentication,
three `pollinate edge run` daemons with warm executors), and its faults.

The server releases a model every two replies while the third device still trains. It is
killed (SIGKILL, the SuperLink's whole process group) while a buffer holds a reply, started
again and the run resumed: the buffered reply is released with the resumed buffer and its
client's epsilon is in the ledger of that release. Then a device's SuperNode is killed
mid-buffer: its task fails or times out, the other devices keep filling buffers, and the run
completes with every release made of two fresh updates.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.support.federation import Federation, rounds_done
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEVICES = 3
RELEASES = 5


def _open_buffer(run_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    """The open buffer's round and its journal lines ((0, []) if none)."""
    done = rounds_done(run_dir)
    path = run_dir / "buffer" / f"round-{done + 1:04d}" / "events.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0, []
    return done + 1, [json.loads(line) for line in lines if line.strip()]


def test_fedbuff_on_a_real_fleet_survives_a_server_crash_mid_buffer(tmp_path: Path) -> None:
    fed = Federation(tmp_path, DEVICES)
    state = fed.state
    with fed:
        fed.start()
        run_dir = tmp_path / "run"
        fed.start_run(run_dir, [
            "--rounds", str(RELEASES), "--round-timeout", "40", "--min-train-nodes", "1",
            "--strategy", "fedbuff", "--set", "buffer-size=2", "--set", "fraction-train=1.0",
            "--set", f"min-available-nodes={DEVICES}", "--set", "fraction-evaluate=0.0",
            "--set", "partitioner=resample", "--set", "samples-per-client=96",
        ])  # fmt: skip

        # a buffer that holds an accepted reply, after at least one release
        buffered: list[dict[str, Any]] = []
        open_round = 0

        def mid_buffer() -> bool:
            nonlocal buffered, open_round
            open_round, events = _open_buffer(run_dir)
            buffered = [e for e in events if e.get("outcome") == "accepted"]
            return open_round >= 2 and len(buffered) == 1

        wait_until("a release, then a buffer holding one reply", mid_buffer, 300, interval=0.05)
        fed.crash_server()
        assert rounds_done(run_dir) == open_round - 1, "the crash came after the release"

        fed.start_server(ready_count=2)
        fed.wait_online("the SuperNodes back online", 240)
        fed.cli("server", "resume", "--state-dir", str(state))
        wait_until("the resumed buffer released", lambda: rounds_done(run_dir) >= open_round, 300)

        # a device's SuperNode dies mid-buffer: the others fill the buffers
        fed.kill_supernode(2)
        final = fed.wait_finished("the resumed run to finish", 400)
        assert final["status"] == "finished:completed" and final["round"] == RELEASES, final

        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [m["server_round"] for m in metrics] == list(range(RELEASES + 1))
        for m in metrics[1:]:  # each release: two updates, the rest accounted apart
            assert m["replied"] - m["declined"] - m["rejected"] - m["stale"] == 2, m
        with sqlite3.connect(run_dir / "ledger.sqlite") as db:
            rows = set(db.execute(
                "SELECT server_round, client FROM client_rounds WHERE release = 'train'"
            ))  # fmt: skip
        assert (open_round, buffered[0]["key"]) in rows, "the buffered reply's epsilon is kept"
        assert not any((run_dir / "buffer").glob("round-*/events.jsonl"))
