"""The federation's Prometheus endpoint: the real HTTP exporter over real run directories.

Each run is described as a scenario (per round: duration, accuracy, loss and what every
sampled client did); the run directory is written from it the way the ServerApp writes it
(RoundRecord rows, the real PrivacyLedger, atomic JSON), and the expected metrics are worked
out from the same scenario with plain Python.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from pollinate.errors import ConfigError
from pollinate.ops.fed_metrics import DURATION_BUCKETS, OUTCOMES, serve_federation_metrics
from pollinate.privacy import PrivacyLedger
from pollinate.rundir.checkpoint import atomic_write_json
from pollinate.rundir.records import RoundRecord
from tests.support.processes import free_port

EPS_PER_ROUND = 0.7  # sample-level epsilon a client spends each time it trains
CLIENT_EPS_PER_ROUND = 0.9  # client-level epsilon after each round


@dataclass
class Round:
    seconds: float
    accuracy: float
    loss: float
    # client -> "ok" | "declined" | "rejected" | "failed"
    clients: dict[str, str] = field(default_factory=dict)


@dataclass
class Scenario:
    run_dir: Path
    target_rounds: int
    initial: tuple[float, float]  # accuracy, loss of round 0
    rounds: list[Round]
    sample_dp: bool = False
    client_dp: bool = False
    mtime: float = 1_700_000_000.25


# ------------------------------------------------------------------ writing run directories


def _count(rnd: Round, outcome: str) -> int:
    outcomes = list(rnd.clients.values())
    if outcome == "sampled":
        return len(outcomes)
    if outcome == "replied":
        return sum(o != "failed" for o in outcomes)
    return outcomes.count(outcome)


def _spent(rnd: Round) -> list[str]:
    """Clients that spent privacy in a round (a rejected update was trained, so it counts)."""
    return [c for c, o in rnd.clients.items() if o in ("ok", "rejected")]


def write_run(s: Scenario) -> None:
    """Write run.json, metrics.json and (for a DP run) privacy.json like the ServerApp."""
    s.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        s.run_dir / "run.json",
        {"settings": {"num-server-rounds": s.target_rounds, "run-dir": str(s.run_dir)},
         "population": 5, "noise": 1.0, "client_noise": None},
    )  # fmt: skip
    ledger = PrivacyLedger(delta=1e-5, sample_level=s.sample_dp, client_level=s.client_dp)
    rows = [RoundRecord(server_round=0, accuracy=s.initial[0], loss=s.initial[1])]
    spent: dict[str, float] = {}
    for n, rnd in enumerate(s.rounds, start=1):
        for client, outcome in rnd.clients.items():
            if outcome == "declined":
                ledger.record_decline(server_round=n, client=client, reason="budget")
        if s.sample_dp:
            for client in _spent(rnd):
                spent[client] = spent.get(client, 0.0) + EPS_PER_ROUND
                ledger.record_client(
                    server_round=n, client=client, epsilon=spent[client], delta=1e-5,
                    noise_multiplier=1.0, sample_rate=0.1, steps=10,
                )  # fmt: skip
        if s.client_dp:
            ledger.record_client_level(
                server_round=n, epsilon=CLIENT_EPS_PER_ROUND * n, delta=1e-5,
                noise_multiplier=1.0, clipping_norm=1.0, num_sampled=4, population=5,
                accounting="Flower RdpAccountant, no amplification",
            )  # fmt: skip
        sample = ledger.summary()["sample_level"]
        assert isinstance(sample, dict)
        record = RoundRecord(
            server_round=n, accuracy=rnd.accuracy, loss=rnd.loss, seconds=rnd.seconds,
            **{o: _count(rnd, o) for o in OUTCOMES},
            max_epsilon=sample["max_epsilon"] if s.sample_dp else None,
            client_level_epsilon=CLIENT_EPS_PER_ROUND * n if s.client_dp else None,
        )  # fmt: skip
        rows.append(record)
    metrics = s.run_dir / "metrics.json"
    atomic_write_json(metrics, [r.to_dict() for r in rows])
    os.utime(metrics, (s.mtime, s.mtime))
    if s.rounds:  # the ServerApp writes privacy.json with metrics.json after each round
        atomic_write_json(
            s.run_dir / "privacy.json",
            {"summary": ledger.summary(), "ledger": ledger.to_dict()},
            indent=None,
        )


def write_runs(state: Path, runs: dict[str, tuple[Path, str]]) -> None:
    """STATE/runs.json: run id -> (run directory, start time)."""
    atomic_write_json(
        state / "runs.json",
        {rid: {"run_dir": str(d), "started": started} for rid, (d, started) in runs.items()},
    )


# ------------------------------------------------------------------ the reference


Key = tuple[str, frozenset[tuple[str, str]]]


def expected(run_id: str, s: Scenario, *, epsilon_from_rows: bool = True) -> dict[Key, float]:
    """Every sample the exporter should give for run ``run_id``, straight from the scenario."""
    out: dict[Key, float] = {}

    def put(name: str, value: float, **labels: str) -> None:
        out[(f"pollinate_federation_{name}", frozenset({"run_id": run_id, **labels}.items()))] = (
            float(value)
        )

    put("round", len(s.rounds))
    put("target_rounds", s.target_rounds)
    for outcome in OUTCOMES:
        put("clients_total", sum(_count(r, outcome) for r in s.rounds), outcome=outcome)
        if s.rounds:
            put("last_round_clients", _count(s.rounds[-1], outcome), outcome=outcome)
    seconds = [r.seconds for r in s.rounds]
    for bound in DURATION_BUCKETS:
        put("round_duration_seconds_bucket", len([x for x in seconds if x <= bound]),
            le=repr(bound))  # fmt: skip
    put("round_duration_seconds_bucket", len(seconds), le="+Inf")
    put("round_duration_seconds_count", len(seconds))
    put("round_duration_seconds_sum", sum(seconds))
    if s.rounds:
        put("last_round_duration_seconds", s.rounds[-1].seconds)
    accuracy, loss = (s.rounds[-1].accuracy, s.rounds[-1].loss) if s.rounds else s.initial
    put("accuracy", accuracy)
    put("loss", loss)
    if s.sample_dp and s.rounds:
        participations: dict[str, int] = {}
        for r in s.rounds:
            for client in _spent(r):
                participations[client] = participations.get(client, 0) + 1
        put("max_epsilon", EPS_PER_ROUND * max(participations.values()))
    if s.client_dp and s.rounds:
        put("client_level_epsilon", CLIENT_EPS_PER_ROUND * len(s.rounds))
    put("last_round_timestamp_seconds", s.mtime)
    return out


# ------------------------------------------------------------------ scraping


@dataclass
class Scrape:
    status: int
    types: dict[str, str]
    samples: dict[Key, float]

    def of_run(self, run_id: str) -> dict[Key, float]:
        return {k: v for k, v in self.samples.items() if ("run_id", run_id) in k[1]}

    def errors(self, file: str) -> float:
        key = ("pollinate_federation_scrape_errors_total", frozenset({("file", file)}))
        return self.samples.get(key, 0.0)


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        status, text = response.status, response.read().decode()
    types: dict[str, str] = {}
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return Scrape(status, types, samples)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def url(state: Path) -> Iterator[str]:
    server, thread = serve_federation_metrics(state, port=0)
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def dp_run(run_dir: Path) -> Scenario:
    """Three of five rounds done, with sample- and client-level DP and every outcome."""
    return Scenario(
        run_dir=run_dir, target_rounds=5, initial=(0.1, 2.3), sample_dp=True, client_dp=True,
        rounds=[
            Round(12.5, 0.61, 1.1, {"c0": "ok", "c1": "ok", "c2": "declined", "c3": "failed"}),
            Round(48.0, 0.74, 0.8, {"c0": "ok", "c2": "rejected", "c4": "ok"}),
            Round(700.0, 0.81, 0.62,
                  {"c1": "ok", "c3": "ok", "c4": "failed", "c0": "ok", "c2": "declined"}),
        ],
    )  # fmt: skip


def fresh_run(run_dir: Path) -> Scenario:
    """Started, initial model evaluated, no round completed yet."""
    return Scenario(run_dir=run_dir, target_rounds=10, initial=(0.098, 2.31), rounds=[])


# ------------------------------------------------------------------ tests


def test_every_metric_and_label_of_two_runs(state: Path, url: str) -> None:
    a, b = dp_run(state / "runs" / "a"), fresh_run(state / "runs" / "b")
    write_run(a)
    write_run(b)
    write_runs(state, {"101": (a.run_dir, "2025-05-01T10:00:00+00:00"),
                       "202": (b.run_dir, "2025-05-02T10:00:00+00:00")})  # fmt: skip
    got = scrape(url)
    assert got.status == 200
    assert got.of_run("101") == expected("101", a)
    assert got.of_run("202") == expected("202", b)
    run_samples = {k for k in got.samples if any(name == "run_id" for name, _ in k[1])}
    assert run_samples == set(expected("101", a)) | set(expected("202", b))
    assert got.types == {
        **{f"pollinate_federation_{n}": "gauge" for n in (
            "round", "target_rounds", "last_round_clients", "last_round_duration_seconds",
            "accuracy", "loss", "metric", "max_epsilon", "client_level_epsilon",
            "last_round_timestamp_seconds")},
        "pollinate_federation_clients": "counter",
        "pollinate_federation_round_duration_seconds": "histogram",
        "pollinate_federation_scrape_errors": "counter",
    }  # fmt: skip
    assert not any(name.startswith("pollinate_federation_scrape_errors") for name, _ in got.samples)


def test_a_tasks_central_metrics_are_exported_by_name(state: Path, url: str) -> None:
    """A regression run has no accuracy; its MAE, RMSE and MAPE are gauges by name, and
    `server status` reports them too."""
    from pollinate.ops.runs import run_status

    run_dir = state / "runs" / "reg"
    write_run(fresh_run(run_dir))
    metrics = {"mse": 4.0, "mae": 1.5, "rmse": 2.0, "mape": 7.25}
    rows = [RoundRecord(server_round=0, accuracy=None, loss=4.0, metrics=metrics).to_dict()]
    atomic_write_json(run_dir / "metrics.json", rows)
    write_runs(state, {"7": (run_dir, "2025-05-01T10:00:00+00:00")})
    got = scrape(url).of_run("7")
    exported = {
        dict(labels)["name"]: value
        for (name, labels), value in got.items()
        if name == "pollinate_federation_metric"
    }
    assert exported == metrics
    assert not any(name == "pollinate_federation_accuracy" for name, _ in got)
    assert run_status(state, "7")["metrics"] == metrics


def test_values_follow_the_files_between_scrapes(state: Path, url: str) -> None:
    run = fresh_run(state / "runs" / "b")
    write_run(run)
    write_runs(state, {"202": (run.run_dir, "2025-05-02T10:00:00+00:00")})
    first = scrape(url)
    assert first.of_run("202") == expected("202", run)
    assert first.samples[("pollinate_federation_round", frozenset({("run_id", "202")}))] == 0

    run.rounds.append(Round(31.0, 0.55, 1.4, {"c0": "ok", "c1": "failed"}))
    run.rounds.append(Round(29.5, 0.66, 1.2, {"c0": "ok", "c1": "ok", "c2": "declined"}))
    run.mtime += 60
    write_run(run)
    second = scrape(url)
    assert second.of_run("202") == expected("202", run)
    assert second.of_run("202") != first.of_run("202")


def test_a_broken_run_does_not_break_the_others(state: Path, url: str) -> None:
    good, bad = dp_run(state / "runs" / "good"), dp_run(state / "runs" / "bad")
    no_privacy, typo = dp_run(state / "runs" / "np"), dp_run(state / "runs" / "typo")
    older = dp_run(state / "runs" / "older")  # metrics.json rows without epsilon
    for run in (good, bad, no_privacy, typo, older):
        write_run(run)
    rows = json.loads((older.run_dir / "metrics.json").read_text())
    for row in rows:
        row.pop("max_epsilon"), row.pop("client_level_epsilon")
    (older.run_dir / "metrics.json").write_text(json.dumps(rows))
    os.utime(older.run_dir / "metrics.json", (older.mtime, older.mtime))
    (bad.run_dir / "metrics.json").write_text('[{"server_round": 0, "accur')  # torn JSON
    rows = json.loads((typo.run_dir / "metrics.json").read_text())
    rows[1]["sampled"] = "four"
    (typo.run_dir / "metrics.json").write_text(json.dumps(rows))
    (no_privacy.run_dir / "privacy.json").write_text("{nope")
    write_runs(state, {
        "1": (good.run_dir, "2025-05-01T10:00:00+00:00"),
        "2": (bad.run_dir, "2025-05-01T11:00:00+00:00"),
        "3": (no_privacy.run_dir, "2025-05-01T12:00:00+00:00"),
        "4": (typo.run_dir, "2025-05-01T13:00:00+00:00"),
        "5": (state / "runs" / "not-yet", "2025-05-01T14:00:00+00:00"),  # nothing written yet
        "6": (older.run_dir, "2025-05-01T15:00:00+00:00"),
    })  # fmt: skip
    got = scrape(url)
    assert got.status == 200
    assert got.of_run("1") == expected("1", good)
    assert got.of_run("6") == expected("6", older)  # epsilon from privacy.json alone
    assert got.of_run("2") == {} and got.of_run("4") == {}
    # privacy.json unreadable: the epsilon of the last round's record instead
    assert got.of_run("3") == expected("3", no_privacy)
    submitted = got.of_run("5")
    assert submitted[("pollinate_federation_round", frozenset({("run_id", "5")}))] == 0
    assert not any(name.startswith("pollinate_federation_last_round") for name, _ in submitted)
    assert (got.errors("metrics.json"), got.errors("privacy.json")) == (2, 1)
    assert scrape(url).errors("metrics.json") == 4  # counted at every scrape


def test_corrupt_or_missing_runs_file_serves_an_empty_federation(state: Path, url: str) -> None:
    empty = scrape(url)  # no state dir at all
    assert empty.status == 200 and empty.samples == {}
    state.mkdir(parents=True)
    (state / "runs.json").write_text("[1, 2")
    broken = scrape(url)
    assert broken.status == 200
    assert broken.samples == {
        ("pollinate_federation_scrape_errors_total", frozenset({("file", "runs.json")})): 1.0
    }


def test_a_resumed_run_is_exported_once_under_its_new_id(state: Path, tmp_path: Path) -> None:
    old, other = dp_run(state / "runs" / "a"), fresh_run(state / "runs" / "b")
    write_run(old)
    write_run(other)
    write_runs(state, {"7": (old.run_dir, "2025-05-01T10:00:00+00:00"),
                       "9": (old.run_dir, "2025-05-03T10:00:00+00:00"),  # `server resume`
                       "8": (other.run_dir, "2025-05-02T10:00:00+00:00")})  # fmt: skip
    for max_runs, runs in ((None, {"9", "8"}), (1, {"9"})):
        server, thread = serve_federation_metrics(state, port=0, max_runs=max_runs)
        try:
            got = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        assert {v for k in got.samples for n, v in k[1] if n == "run_id"} == runs
        assert got.of_run("9") == expected("9", old)


def test_a_port_in_use_is_one_clear_error(state: Path, url: str) -> None:
    port = int(url.split(":")[2].split("/")[0])
    with pytest.raises(ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{port}"):
        serve_federation_metrics(state, port=port)
    with pytest.raises(ConfigError, match=r"--metrics-port must be 0\.\.65535"):
        serve_federation_metrics(state, port=70000)


def test_server_start_serves_metrics_while_the_superlink_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pollinate server start --metrics-port`: served once ready, closed when it stops.

    The SuperLink itself is replaced by a stand-in (no Flower processes in this test)."""
    import pollinate.ops.superlink as superlink
    from pollinate.cli.server import server_app

    certs, state, port = tmp_path / "certs", tmp_path / "state", free_port()
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("")  # only their presence is checked before the start
    run = dp_run(state / "runs" / "a")
    write_run(run)
    write_runs(state, {"42": (run.run_dir, "2025-05-01T10:00:00+00:00")})
    seen: dict[str, Any] = {}

    def fake_superlink(settings: Any, trust: list[Path], *, on_ready: Any = None) -> int:
        on_ready(settings)
        seen["scrape"] = scrape(f"http://127.0.0.1:{port}/metrics")
        return -15  # stopped by SIGTERM

    monkeypatch.setattr(superlink, "run_superlink", fake_superlink)
    result = CliRunner().invoke(server_app, [
        "start", "--certs", str(certs), "--state-dir", str(state), "--metrics-port", str(port),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Metrics at http://127.0.0.1:{port}/metrics" in result.output
    assert seen["scrape"].of_run("42") == expected("42", run)
    with pytest.raises(urllib.error.URLError):
        scrape(f"http://127.0.0.1:{port}/metrics")  # shut down with the SuperLink
