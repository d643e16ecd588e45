"""A server crash in the middle of a real federation, and `pollinate server resume`.

SuperLink (TLS + SuperNode authentication) and three `pollinate edge run` daemons on
loopback. After round 2 the SuperLink's whole process group (the SuperLink and the ServerApp
it runs) and `pollinate server start` are killed with SIGKILL. The server is started again on
the same state directory, the daemons' SuperNodes reconnect, and `pollinate server resume`
continues the run: no completed round is lost, every round appears once, and no client's
epsilon goes backwards. `server logs` and `server pull` work on the finished run.
"""

from __future__ import annotations

import itertools
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pollinate.privacy import PrivacyLedger
from pollinate.privacy.ledger_store import LEDGER_FILE, LedgerStore
from tests.support.federation import Federation, rounds_done
from tests.support.processes import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEVICES = 3
ROUNDS = 4


def _epsilons(entries: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in entries:
        series.setdefault(entry["client"], []).append((entry["server_round"], entry["epsilon"]))
    return series


def _group_members(group: int) -> list[int]:
    """Live (not zombie) processes in process group ``group``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_a_crashed_server_resumes_without_losing_rounds_or_epsilon(tmp_path: Path) -> None:
    metrics_port = free_port()
    fed = Federation(tmp_path, DEVICES, server_args=["--metrics-port", str(metrics_port)])
    state = fed.state
    with fed:
        fed.start()
        run_dir = tmp_path / "run"
        first = fed.start_run(run_dir, ["--rounds", str(ROUNDS), "--round-timeout", "120",
                                        "--min-train-nodes", str(DEVICES),
                                        "--set", "fraction-train=1.0",
                                        "--set", "fraction-evaluate=0.0"])  # fmt: skip

        wait_until("round 2", lambda: rounds_done(run_dir) >= 2, 300)
        link = fed.crash_server()  # the SuperLink's group (with the ServerApp) and wrapper
        crashed_metrics = json.loads((run_dir / "metrics.json").read_text())
        # during a run the ledger's history is in its database (privacy.json: the summary)
        crashed_ledger = PrivacyLedger.from_store(LedgerStore(run_dir / LEDGER_FILE))
        crashed_entries = [dict(vars(e)) for e in crashed_ledger.entries]
        done = len(crashed_metrics) - 1
        assert 2 <= done < ROUNDS, crashed_metrics

        fed.start_server(ready_count=2)
        # the restarted server stops what the crashed one left running (its ServerApp)
        assert _group_members(link["superexec_pid"]) == [], "a ServerApp of the crash survives"
        fed.wait_online("the SuperNodes back online", 240)
        resumed = fed.cli("server", "resume", "--state-dir", str(state))
        second = resumed.strip().splitlines()[-1]
        assert second != first

        final = fed.wait_finished("the resumed run to finish", 400)
        assert final["run_id"] == second and final["resumed_from"] == first
        assert final["status"] == "finished:completed" and final["round"] == ROUNDS, final

        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [m["server_round"] for m in metrics] == list(range(ROUNDS + 1))
        # the rounds completed before the crash are kept exactly as they were
        assert metrics[: done + 1] == crashed_metrics
        assert all(m["sampled"] == m["replied"] + m["failed"] for m in metrics[1:]), metrics
        assert all(m["replied"] >= 1 for m in metrics[1:]), metrics

        privacy = json.loads((run_dir / "privacy.json").read_text())
        # rows of a round committed just before the crash, past its checkpoint, are dropped
        before = _epsilons([e for e in crashed_entries if e["server_round"] <= done])
        after = _epsilons(privacy["ledger"]["clients"])
        assert set(before) <= set(after) and len(after) <= DEVICES
        for client, series in after.items():
            rounds = [r for r, _ in series]
            assert all(b > a for a, b in itertools.pairwise(rounds)) and rounds[-1] <= ROUNDS
            kept = [(r, e) for r, e in series if r <= done]
            assert kept == before.get(client, []), "completed rounds' epsilons are kept"
            epsilons = [e for _, e in series]
            assert all(b > a for a, b in itertools.pairwise(epsilons)), series
        assert any(r > done for series in after.values() for r, _ in series)
        # each device's own accountant covers every round it trained, the lost one included
        for i in range(DEVICES):
            device = json.loads(
                fed.cli("edge", "status", "--state-dir", str(fed.device_dir(i)), "--json")
            )
            (client,) = device["clients"]
            if client["client"] in after:
                assert client["epsilon"] >= after[client["client"]][-1][1] - 1e-9

        # the federation's Prometheus endpoint (read from the run directory) agrees
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
            scraped = {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(r.read().decode())
                for sample in family.samples
            }
        run_label = (("run_id", second),)
        assert scraped[("pollinate_federation_round", run_label)] == ROUNDS
        assert scraped[("pollinate_federation_max_epsilon", run_label)] == pytest.approx(
            privacy["summary"]["sample_level"]["max_epsilon"]
        )
        replied = (("outcome", "replied"), ("run_id", second))
        assert scraped[("pollinate_federation_clients_total", replied)] == DEVICES * ROUNDS

        fed.cli("server", "logs", "--state-dir", str(state), timeout=120)
        pulled = tmp_path / "pulled" / f"run-{second}"
        fed.cli("server", "pull", str(tmp_path / "pulled"), "--state-dir", str(state))
        assert json.loads((pulled / "metrics.json").read_text()) == metrics
        assert (pulled / "LATEST").read_text().strip() == f"checkpoints/round-{ROUNDS:04d}"
        assert (pulled / "checkpoints" / f"round-{ROUNDS:04d}" / "model.safetensors").is_file()
    assert fed.codes == [0] * DEVICES
