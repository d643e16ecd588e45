"""What ``pollinate/_flower.py`` changes in Flower, checked on Flower's own objects in a fresh
interpreter (the changes are process-wide): object-pull retries start at 50 ms, and a
SQLite state Flower opens (the SuperLink's) waits 60 s for its write lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
