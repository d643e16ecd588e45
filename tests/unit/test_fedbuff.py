"""Buffered asynchronous rounds (``strategy = fedbuff``) on the fast engine's simulated fleet.

The latency model against the distribution it claims; a release against a numpy reference;
whole runs with stragglers and drop-outs; client-level DP per buffer against dp-accounting;
a server stopped mid-buffer that resumes with every buffered reply accounted; bad input.
"""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest

from pollinate.config import RunSettings, StalenessWeighting
from pollinate.errors import ConfigError
from pollinate.serverapp.buffer_journal import BufferEntry, BufferJournal
from pollinate.serverapp.fedbuff import BufferedRounds
from pollinate.serverapp.federation import run_federation
from pollinate.serverapp.setup import start_run
from pollinate.simulation.latency import LatencyModel, SimulatedNetwork
from pollinate.simulation.local_grid import LocalGrid

pytestmark = pytest.mark.unit

FLEET = 20


def _settings(run_dir: Path, **overrides: object) -> RunSettings:
    return RunSettings.from_run_config(
        {
            "run-dir": str(run_dir),
            "dataset": "digits",
            "model": "mlp",
            "strategy": "fedbuff",
            "buffer-size": 4,
            "fraction-train": 0.5,  # 10 clients training at once
            "num-server-rounds": 6,
            "min-available-nodes": FLEET,
            "round-timeout": 60.0,
            **overrides,
        }
    )


def _fleet(**latency: Any) -> LocalGrid:
    model = LatencyModel(**{"median_s": 10.0, "slow_fraction": 0.2, "dropout": 0.1, **latency})
    return LocalGrid(FLEET, latency=model)


def _ledger_rows(run_dir: Path) -> list[tuple[Any, ...]]:
    """(round, client, release) of every client-round row of the ledger database."""
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        return list(db.execute("SELECT server_round, client, release FROM client_rounds"))


# ---------------------------------------------------------------------- the latency model
def test_latency_model_draws_the_distribution_it_describes() -> None:
    model = LatencyModel(median_s=10.0, sigma=0.5, slow_fraction=0.1, slow_factor=10.0,
                         dropout=0.05, seed=3)  # fmt: skip
    slow = [d for d in range(2000) if model.is_slow(d)]
    assert 0.08 < len(slow) / 2000 < 0.12
    fast = [d for d in range(2000) if not model.is_slow(d)][:400]
    draws = [model.draw(d, n) for d in fast for n in range(5)]
    kept = [t for t in draws if t is not None]
    assert 0.035 < 1 - len(kept) / len(draws) < 0.065  # drop-outs
    assert 9.0 < float(np.median(kept)) < 11.0  # log-normal median
    assert 0.45 < float(np.std(np.log(kept))) < 0.55  # and sigma
    slow_draws = [t for d in slow[:100] for n in range(5) if (t := model.draw(d, n)) is not None]
    assert 90.0 < float(np.median(slow_draws)) < 110.0  # 10x slower
    assert model.draw(7, 2) == LatencyModel(**{**vars(model)}).draw(7, 2)  # repeatable


def test_staleness_weights() -> None:
    assert StalenessWeighting.POLYNOMIAL.weight(0) == 1.0
    assert StalenessWeighting.POLYNOMIAL.weight(3) == pytest.approx(0.5)
    assert StalenessWeighting.CONSTANT.weight(9) == 1.0


def test_a_synchronous_round_waits_for_its_slowest_reply_or_the_timeout(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "run", strategy="fedavg", **{"num-server-rounds": 3})
    result = run_federation(_fleet(), settings)
    for record in result.history[1:]:
        assert record.replied + record.failed == record.sampled
    # a round with a drop-out lasts the whole timeout; none lasts longer
    steps = np.diff([r.elapsed_s or 0.0 for r in result.history])
    assert all(0 < s <= 60.0 + 1e-9 for s in steps)
    assert sum(r.failed for r in result.history) > 0


# ---------------------------------------------------------------------- a release
def test_a_release_is_the_weighted_mean_of_the_buffered_deltas(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "run", dp="none", **{"server-learning-rate": 0.5})
    run = start_run(LocalGrid(FLEET), settings)
    rounds = BufferedRounds(run)
    current = {k: v.copy() for k, v in run.arrays.items()}
    rng = np.random.default_rng(0)

    def delta() -> dict[str, np.ndarray]:
        return {k: rng.normal(size=a.shape).astype(np.float32) for k, a in current.items()}

    entries = [
        BufferEntry(key=f"{i:06d}", node=0, version=v, delta=delta(),
                    metrics={"num-examples": n, "train-loss": 1.0})
        for i, (v, n) in enumerate([(2, 10), (0, 30), (1, 20), (2, 40)])
    ]  # fmt: skip
    rounds._release(3, list(entries))  # release 3: the current model is version 2
    total = sum(e.metrics["num-examples"] for e in entries)
    for key, value in current.items():
        weighted = sum(
            e.metrics["num-examples"] / total / math.sqrt(1 + 2 - e.version) * e.delta[key]
            for e in entries
        )
        np.testing.assert_allclose(run.arrays[key], value + 0.5 * weighted, atol=1e-5)


# ---------------------------------------------------------------------- whole runs
def test_fedbuff_releases_every_buffer_without_waiting_for_stragglers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_federation(_fleet(), _settings(run_dir, **{"max-staleness": 1}))
    rounds = result.history[1:]
    assert [r.server_round for r in rounds] == list(range(1, 7))
    for r in rounds:  # every buffer holds buffer-size updates; the rest is accounted apart
        assert r.replied - r.declined - r.rejected - r.stale == 4
    assert sum(r.stale for r in rounds) > 0  # slow clients come back too late
    elapsed = [r.elapsed_s or 0.0 for r in rounds]
    assert all(b > a for a, b in itertools.pairwise(elapsed))
    # a slow device takes ~100 s: buffers are released long before
    assert elapsed[-1] / len(elapsed) < 30
    # under DP-SGD every reply's epsilon is in the ledger, stale ones included, once a round
    train = [(row[0], row[1]) for row in _ledger_rows(run_dir) if row[2] == "train"]
    assert len(train) == len(set(train))
    assert len(train) == sum(r.replied - r.declined - r.rejected for r in rounds)
    assert not (run_dir / "buffer").exists() or not any((run_dir / "buffer").iterdir())


def test_client_level_dp_is_one_release_per_buffer(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    settings = _settings(
        run_dir,
        dp="none",
        **{"client-dp": "server-fixed", "client-dp-noise": 1.5, "client-dp-clip": 0.01},
    )
    run_federation(_fleet(dropout=0.0), settings)
    privacy = json.loads((run_dir / "privacy.json").read_text())
    releases = privacy["ledger"]["client_level_releases"]
    assert len(releases) == 6
    taken: Counter[str] = Counter()
    for release in releases:
        assert len(release["clients"]) == len(set(release["clients"])) == 4
        assert release["num_sampled"] == 4  # the mean's denominator: the buffer
        taken.update(release["clients"])
    worst = max(taken.values())
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.5), worst)
    rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(settings.target_delta)
    pld = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(settings.target_delta)
    assert releases[-1]["epsilon"] == pytest.approx(min(rdp, pld), rel=0.01)


class _CrashError(Exception):
    pass


class _CrashErroringGrid(LocalGrid):
    """Stops the server (an exception out of the grid) at its ``after``-th pull."""

    def __init__(self, after: int, **kwargs: Any) -> None:
        super().__init__(FLEET, latency=LatencyModel(median_s=10.0, slow_fraction=0.2), **kwargs)
        self.after = after

    def pull_messages(self, message_ids: Any) -> Any:
        self.after -= 1
        if self.after == 0:
            raise _CrashError
        return super().pull_messages(message_ids)


def test_a_restart_mid_buffer_keeps_every_buffered_reply(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    settings = _settings(run_dir, **{"num-server-rounds": 4})
    with pytest.raises(_CrashError):
        run_federation(_CrashErroringGrid(after=12), settings)
    saved = json.loads((run_dir / "metrics.json").read_text())[-1]["server_round"]
    open_round = saved + 1
    events_file = BufferJournal(run_dir).folder(open_round) / "events.jsonl"
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    buffered = {e["key"] for e in events if e["outcome"] in ("accepted", "stale")}
    assert buffered, "the crash should come mid-buffer"

    resumed = run_federation(LocalGrid(FLEET), settings.replace(resume=True))
    record = next(r for r in resumed.history if r.server_round == open_round)
    assert record.replied >= len(events)
    rows = _ledger_rows(run_dir)
    trained = {client for rnd, client, release in rows if rnd == open_round and release == "train"}
    assert buffered <= trained  # no epsilon lost with the process
    assert [r.server_round for r in resumed.history] == list(range(5))


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max-staleness": -1}, "max-staleness"),
        ({"secure-aggregation": True}, "secure-aggregation"),
        ({"client-sampling": "poisson"}, "poisson"),
        ({"dp": "none", "client-dp": "ftrl-tree"}, "ftrl-tree"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_buffered_settings_are_refused(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, **overrides)


def test_a_buffer_larger_than_the_fleet_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than the fleet"):
        run_federation(LocalGrid(FLEET), _settings(tmp_path / "a", **{"buffer-size": 25}))
    with pytest.raises(ConfigError, match="training at once"):
        run_federation(LocalGrid(FLEET), _settings(tmp_path / "b", **{"buffer-size": 12}))


def test_the_clock_moves_past_replies_nobody_pulls() -> None:
    """A reply the server gave up on (timed out) stays due but unpulled; waiting for the next
    one must not stop at it."""
    net = SimulatedNetwork(LatencyModel(median_s=1.0))
    late, next_one = object(), object()
    net.send("given-up", late, 5.0)  # type: ignore[arg-type]
    net.send("wanted", next_one, 10.0)  # type: ignore[arg-type]
    net.advance(100.0)
    assert net.clock == 5.0
    assert net.pull(["wanted"]) == []
    net.advance(100.0)
    assert net.clock == 10.0
    assert net.pull(["wanted"]) == [next_one]
    net.advance(100.0)
    assert net.clock == 100.0  # nothing more to come: the deadline


def test_tasks_that_never_answer_time_out_on_the_simulated_clock(tmp_path: Path) -> None:
    """Half the tasks drop out, and the timeout is a sum that floats round: every one still
    times out at its deadline (a release never waits forever for the dropped)."""
    settings = _settings(tmp_path / "run", **{"round-timeout": 0.3, "num-server-rounds": 3})
    grid = LocalGrid(FLEET, latency=LatencyModel(median_s=0.1, sigma=0.0, dropout=0.5, seed=1))
    done = threading.Event()
    result: list[Any] = []

    def play() -> None:
        result.append(run_federation(grid, settings))
        done.set()

    threading.Thread(target=play, daemon=True).start()
    assert done.wait(120), "a buffer waited forever for tasks that dropped out"
    rounds = result[0].history[1:]
    assert len(rounds) == 3 and sum(r.failed for r in rounds) > 0
