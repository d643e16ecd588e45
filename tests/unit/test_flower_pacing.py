"""What ``pollinate/_flower.py`` changes in Flower, checked on Flower's own objects in a fresh
interpreter (the changes are process-wide): object-pull retries start at 50 ms, and a
SQLite state Flower opens (the SuperLink's) waits 60 s for its write lock; and the
SuperLink's abort checks (put back after their test); and a warm device's task heartbeat
clock, on Flower's own SuperNode state and heartbeat sender."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pollinate._flower import task_heartbeat_s
from pollinate.device.wake import warm_executor_env
from pollinate.ops.superlink import SuperLinkSettings, superlink_command

CODE = """
import sys, inspect
from flwr.supercore.inflatable import inflatable_utils as u
from flwr.supercore.sql_mixin import SqlMixin
from sqlalchemy import text

class State(SqlMixin):  # Flower's SQL base: engine, pragmas and sessions are Flower's
    pass

def busy_timeout(path):
    state = State(path)
    state.initialize()
    with state.session() as session:
        return session.execute(text("PRAGMA busy_timeout")).scalar()

before = (u.pull_objects.__kwdefaults__["initial_backoff"], busy_timeout(sys.argv[1] + "/a.db"))
from pollinate._flower import pace_object_pulls, patient_sqlite
assert pace_object_pulls() and patient_sqlite()
kw = u.pull_and_inflate_object_from_tree.__kwdefaults__
after = (u.pull_objects.__kwdefaults__["initial_backoff"], busy_timeout(sys.argv[1] + "/b.db"))
print(before, after, kw["initial_backoff"], kw["backoff_cap"], kw["max_tries_per_object"])
"""


def test_pulls_retry_sooner_and_sqlite_waits_longer(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["(1,", "5000)", "(0.05,", "60000)", "0.05", "1.0", "5000"]


def test_the_superlink_runs_through_the_patient_wrapper(tmp_path: Path) -> None:
    for name in ("ca.crt", "server.pem", "server.key"):
        (tmp_path / name).write_text("not read here")
    settings = SuperLinkSettings(certs=tmp_path, state_dir=tmp_path)
    assert superlink_command(settings)[:3] == [
        sys.executable,
        "-m",
        "pollinate.ops.flower_superlink",
    ]


RECORDS = """
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

def outcome(fn):
    try:
        return repr(fn())
    except Exception as err:
        return type(err).__name__ + ": " + str(err)

def behaviour():
    arr = Array(np.arange(3, dtype=np.float32))
    tries = {
        "metric ok": lambda: dict(MetricRecord({"a": 1, "b": [0.5, 1.5]})),
        "metric bad value": lambda: MetricRecord({"a": "text"}),
        "metric bad key": lambda: MetricRecord({1: 2.0}),
        "config ok": lambda: dict(ConfigRecord({"a": "x", "b": b"y", "c": [True]})),
        "config bad value": lambda: ConfigRecord({"a": object()}),
        "array ok": lambda: list(ArrayRecord({"w": arr})),
        "array bad value": lambda: ArrayRecord({"w": [1, 2]}),
        "records ok": lambda: sorted(RecordDict({"m": MetricRecord({"a": 1})}).metric_records),
        "records bad value": lambda: RecordDict({"m": {"a": 1}}),
        "records bad key": lambda: RecordDict({3: MetricRecord()}),
        "missing key": lambda: MetricRecord({"a": 1})["b"],
    }
    out = {name: outcome(fn) for name, fn in tries.items()}
    record = MetricRecord({"a": 1, "b": 2.0})
    del record["a"]
    out["after delete"] = repr(dict(record))
    return out

before = behaviour()
from flwr.app.message.typeddict import TypedDict
from pollinate._flower import quick_record_items
assert quick_record_items() and quick_record_items()  # a second call: already done
assert "cast" not in TypedDict.__setitem__.__code__.co_names
assert "cast" not in TypedDict.__getitem__.__code__.co_names
after = behaviour()
print(json.dumps({"before": before, "after": after}))
"""


def test_quick_record_items_keep_flowers_checks_errors_and_storage() -> None:
    """Every record kind stores, refuses (same exception, same words) and deletes items as
    before the swap; the swapped methods build no typing aliases."""
    import json

    proc = subprocess.run(
        [sys.executable, "-c", RECORDS], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    assert seen["after"] == seen["before"]
    assert seen["before"]["metric bad value"].startswith("TypeError")
    assert seen["before"]["records bad key"].startswith("TypeError")
    assert seen["before"]["missing key"].startswith("KeyError")
    assert seen["before"]["after delete"] == "{'b': 2.0}"


class _Runs:
    """A LinkState's two methods that Flower's ``check_abort`` calls, counting the queries."""

    def __init__(self) -> None:
        from flwr.common.constant import Status

        self.status = Status.RUNNING
        self.sub_status = ""
        self.queries = 0
        self.cleaned: list[int] = []

    def get_run_status(self, run_ids: set[int]) -> dict[int, object]:
        from flwr.supercore.run import RunStatus

        self.queries += 1
        return {rid: RunStatus(self.status, self.sub_status, "") for rid in run_ids}

    def cleanup_run(self, run_id: int) -> None:
        self.cleaned.append(run_id)


def test_quick_abort_checks_trust_a_live_run_briefly_and_never_a_stopped_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the SuperLink's fleet handlers call is swapped; a live run's answer is reused
    for the TTL (one query), a stop is heard once the TTL is over, and a stopped run is
    asked about (and refused) on every request, Flower's own words and clean-up included."""
    from flwr.common.constant import Status, SubStatus
    from flwr.superlink.servicer.fleet import fleet_handlers

    from pollinate._flower import quick_abort_checks

    flowers = fleet_handlers.check_abort
    monkeypatch.setattr(fleet_handlers, "check_abort", flowers)  # put back after the test
    ttl = 0.3
    assert quick_abort_checks(ttl) and quick_abort_checks(ttl)  # a second call: already done
    check = fleet_handlers.check_abort
    assert check is not flowers
    aborting = [Status.PENDING, Status.STARTING, Status.FINISHED]
    runs, other = _Runs(), _Runs()

    assert [check(7, aborting, runs) for _ in range(5)] == [None] * 5
    assert runs.queries == 1
    assert check(8, aborting, runs) is None and runs.queries == 2  # another run: its own
    assert check(7, aborting, other) is None and other.queries == 1  # another state: its own

    runs.status, runs.sub_status = Status.FINISHED, SubStatus.STOPPED
    assert check(7, aborting, runs) is None  # within the TTL: not heard yet
    time.sleep(ttl + 0.05)
    expected = flowers(7, aborting, _stopped())
    assert expected is not None and "Stopped by user" in expected
    for _ in range(3):
        assert check(7, aborting, runs) == expected
    assert runs.queries == 2 + 3 and runs.cleaned == [7, 7, 7]  # each stopped check asks


def _stopped() -> _Runs:
    from flwr.common.constant import Status, SubStatus

    runs = _Runs()
    runs.status, runs.sub_status = Status.FINISHED, SubStatus.STOPPED
    return runs


TASK_EXPIRY = """
import sys, time
from flwr.common.constant import Status
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode.nodestate import NodeStateFactory

from pollinate._flower import quick_task_expiry

side, interval = sys.argv[1], float(sys.argv[2])
if interval:
    assert quick_task_expiry(interval, side=side)
if side == "node":  # Flower's own task state, as a SuperNode holds it
    state = NodeStateFactory(ObjectStoreFactory()).state()
    task_id = state.create_task(TaskType.CLIENT_APP, run_id=1)
    assert state.claim_task(task_id)
    time.sleep(0.6)  # its executor's fork died before it started the task
    print(state.get_tasks(task_ids=[task_id])[0].status.status)
    if state.claim_task(task_id) and state.activate_task(task_id):  # offered again, started
        time.sleep(1.1)  # the fork was killed mid-task
        task = state.get_tasks(task_ids=[task_id])[0]
        print(task.status.status, task.status.sub_status)
else:  # Flower's own heartbeat sender, as a fork runs it
    beats = []
    sender = HeartbeatSender(lambda: beats.append(time.monotonic()) or True)
    sender.start()
    time.sleep(1.2)
    sender.stop()
    print(len(beats))
"""


def _task_expiry(side: str, interval: float) -> list[str]:
    run = subprocess.run(
        [sys.executable, "-c", TASK_EXPIRY, side, str(interval)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return run.stdout.strip().splitlines()


def test_a_dead_forks_task_is_offered_again_then_failed_on_the_shorter_clock() -> None:
    """Flower's SuperNode state on a 0.5 s clock: a claimed task not started within it is
    pending again; a started one silent for twice it has failed (Flower then sends the server
    its error reply). On Flower's own 30 s clock the same task is still "starting"."""
    assert _task_expiry("node", 0.5) == ["pending", "finished failed"]
    assert _task_expiry("node", 0) == ["starting"]


def test_forks_send_heartbeats_on_the_shorter_clock() -> None:
    """Flower's heartbeat sender waits (interval - 5 s) x 0.7-0.9: at 5.5 s, a beat every
    0.35-0.45 s (3-4 in 1.2 s); on Flower's 30 s, one."""
    assert 3 <= int(_task_expiry("task", 5.5)[0]) <= 4
    assert _task_expiry("task", 0) == ["1"]


@pytest.mark.parametrize("value", ["5", "31", "nan", "ten"])
def test_a_task_heartbeat_outside_6_to_30_s_is_one_clear_error(value: str) -> None:
    with pytest.raises(SystemExit, match=rf"POLLINATE_TASK_HEARTBEAT_S='{value}' is not a nu"):
        task_heartbeat_s(value)
    assert task_heartbeat_s("10") == 10.0


def test_a_warm_executor_gets_its_fifo_and_the_10_s_clock(tmp_path: Path) -> None:
    env = warm_executor_env(tmp_path)
    assert env == {
        "POLLINATE_EXECUTOR_WAKE": str((tmp_path / "executor.wake").resolve()),
        "POLLINATE_TASK_HEARTBEAT_S": "10",
    }
    assert stat.S_ISFIFO(os.stat(env["POLLINATE_EXECUTOR_WAKE"]).st_mode)
