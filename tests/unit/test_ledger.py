"""Tests of pollinate.privacy.ledger: the server's record of privacy spending."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.errors import ConfigError
from pollinate.privacy import PrivacyLedger
from pollinate.privacy.ledger_summary import NOTE

pytestmark = pytest.mark.unit

DELTA = 1e-5


def _client(
    ledger: PrivacyLedger, server_round: int, client: str, epsilon: float, **kw: Any
) -> None:
    """Record a client report with default mechanism parameters."""
    arguments: dict[str, Any] = {
        "delta": DELTA,
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "steps": 10,
    }
    arguments.update(kw)
    ledger.record_client(server_round=server_round, client=client, epsilon=epsilon, **arguments)


def _client_level(ledger: PrivacyLedger, server_round: int, epsilon: float) -> None:
    """Record a client-level release with default parameters."""
    ledger.record_client_level(
        server_round=server_round,
        epsilon=epsilon,
        delta=DELTA,
        noise_multiplier=0.8,
        clipping_norm=0.5,
        num_sampled=10,
        population=100,
        accounting="rdp",
    )


def _populated() -> PrivacyLedger:
    """A ledger with sample-level, decline and client-level entries over three rounds."""
    ledger = PrivacyLedger(delta=DELTA, sample_level=True, client_level=True)
    _client(ledger, 1, "0", 0.5)
    _client(ledger, 1, "1", 0.25, sample_rate=0.02, steps=5)
    ledger.record_decline(server_round=1, client="2", reason="budget")
    _client_level(ledger, 1, 0.3)
    _client(ledger, 2, "0", 0.75, noise_multiplier=1.5)
    ledger.record_decline(server_round=2, client="1", reason="budget")
    _client_level(ledger, 2, 0.45)
    _client(ledger, 3, "1", 0.5)
    _client(ledger, 3, "3", 0.125, sample_rate=0.005)
    ledger.record_decline(server_round=3, client="0", reason="budget exhausted")
    _client_level(ledger, 3, 0.6)
    return ledger


# ---------------------------------------------------------------- summary statistics


@settings(max_examples=30, deadline=None)
@given(
    increments=st.lists(
        st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=4),
        min_size=1,
        max_size=12,
    ),
    declined_only=st.integers(min_value=0, max_value=3),
)
def test_summary_statistics_match_numpy(increments: list[list[float]], declined_only: int) -> None:
    ledger = PrivacyLedger(delta=DELTA, sample_level=True, client_level=False)
    latest: dict[str, float] = {}
    steps: dict[str, int] = {}
    for index, client_increments in enumerate(increments):
        client = f"client-{index}"
        epsilon = 0.0
        for server_round, increment in enumerate(client_increments, start=1):
            epsilon += increment
            _client(ledger, server_round, client, epsilon, steps=server_round)
        latest[client] = epsilon
        steps[client] = sum(range(1, len(client_increments) + 1))
    for index in range(declined_only):  # clients that never trained are not in the statistics
        ledger.record_decline(server_round=1, client=f"declined-{index}", reason="budget")

    values = np.array(list(latest.values()))
    sample = ledger.summary()["sample_level"]
    assert isinstance(sample, dict)
    assert ledger.client_epsilons() == latest
    assert sample["clients"] == len(latest)
    assert sample["max_epsilon"] == pytest.approx(float(np.max(values)))
    assert sample["median_epsilon"] == pytest.approx(float(np.median(values)))
    assert sample["mean_epsilon"] == pytest.approx(float(np.mean(values)))
    assert sample["total_steps_max"] == max(steps.values())
    assert sample["declines"] == declined_only


def test_summary_of_populated_ledger() -> None:
    summary = _populated().summary()
    assert summary["delta"] == DELTA
    assert summary["note"] == NOTE
    sample = summary["sample_level"]
    assert sample == {
        "enabled": True,
        "clients": 3,
        "max_epsilon": 0.75,
        "median_epsilon": 0.5,
        "mean_epsilon": pytest.approx((0.75 + 0.5 + 0.125) / 3),
        "total_steps_max": 20,
        "mechanism": {
            "accounting": "rdp",
            "noise_multiplier": None,
            "noise_multipliers": [1.0, 1.5],
            "sample_rates": [0.005, 0.02],
            "steps_per_round": [5, 10],
        },
        "declines": 3,
    }


def test_summary_of_empty_ledger() -> None:
    summary = PrivacyLedger(delta=DELTA, sample_level=False, client_level=False).summary()
    sample = summary["sample_level"]
    client_level = summary["client_level"]
    assert isinstance(sample, dict)
    assert isinstance(client_level, dict)
    assert sample["enabled"] is False
    assert sample["clients"] == 0
    assert sample["max_epsilon"] is None
    assert sample["median_epsilon"] is None
    assert sample["total_steps_max"] == 0
    assert client_level["enabled"] is False
    assert client_level["epsilon"] is None
    assert client_level["releases"] == 0
    json.dumps(summary)  # JSON-ready


def test_constant_mechanism_reports_single_noise_multiplier() -> None:
    ledger = PrivacyLedger(delta=DELTA, sample_level=True, client_level=False)
    _client(ledger, 1, "a", 1.0)
    _client(ledger, 1, "b", 1.0)
    mechanism = ledger.summary()["sample_level"]["mechanism"]  # type: ignore[index]
    assert mechanism["noise_multiplier"] == 1.0
    assert mechanism["noise_multipliers"] == [1.0, 1.0]


# ---------------------------------------------------------------- monotonicity and validation


def test_epsilon_going_backwards_raises() -> None:
    ledger = PrivacyLedger(delta=DELTA, sample_level=True, client_level=False)
    _client(ledger, 1, "a", 1.0)
    _client(ledger, 2, "a", 1.0)  # equal is fine (non-decreasing)
    with pytest.raises(ValueError, match="backwards"):
        _client(ledger, 3, "a", 0.999)
    _client(ledger, 3, "b", 0.5)  # other clients are independent
    assert ledger.client_epsilons() == {"a": 1.0, "b": 0.5}


def test_round_not_after_previous_raises() -> None:
    ledger = PrivacyLedger(delta=DELTA, sample_level=True, client_level=False)
    _client(ledger, 2, "a", 1.0)
    with pytest.raises(ValueError, match="round"):
        _client(ledger, 2, "a", 2.0)
    with pytest.raises(ValueError, match="round"):
        _client(ledger, 1, "a", 2.0)


def test_client_level_epsilon_going_backwards_raises() -> None:
    ledger = PrivacyLedger(delta=DELTA, sample_level=False, client_level=True)
    _client_level(ledger, 1, 0.5)
    with pytest.raises(ValueError, match="backwards"):
        _client_level(ledger, 2, 0.4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"server_round": -1},
        {"server_round": 1.0},
        {"client": ""},
        {"client": 3},
        {"epsilon": -0.1},
        {"epsilon": math.nan},
        {"delta": 0.0},
        {"noise_multiplier": 0.0},
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"steps": 0},
        {"steps": True},
    ],
)
def test_record_client_validates(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {
        "server_round": 1,
        "client": "a",
        "epsilon": 1.0,
        "delta": DELTA,
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "steps": 1,
    }
    arguments.update(kwargs)
    ledger = PrivacyLedger(delta=DELTA, sample_level=True, client_level=False)
    with pytest.raises(ConfigError):
        ledger.record_client(**arguments)
    assert ledger.entries == ()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clipping_norm": 0.0},
        {"num_sampled": 0},
        {"num_sampled": 11, "population": 10},
        {"accounting": ""},
        {"epsilon": -1.0},
    ],
)
def test_record_client_level_validates(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {
        "server_round": 1,
        "epsilon": 1.0,
        "delta": DELTA,
        "noise_multiplier": 1.0,
        "clipping_norm": 1.0,
        "num_sampled": 5,
        "population": 10,
        "accounting": "rdp",
    }
    arguments.update(kwargs)
    ledger = PrivacyLedger(delta=DELTA, sample_level=False, client_level=True)
    with pytest.raises(ConfigError):
        ledger.record_client_level(**arguments)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1.0, math.nan, "1e-5"])
def test_ledger_delta_validated(delta: object) -> None:
    with pytest.raises(ConfigError, match="delta"):
        PrivacyLedger(delta=delta, sample_level=True, client_level=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------- declines


def test_declines_are_counted_and_kept_apart() -> None:
    ledger = PrivacyLedger(delta=DELTA, sample_level=True, client_level=False)
    ledger.record_decline(server_round=1, client="a", reason="budget")
    ledger.record_decline(server_round=2, client="a", reason="budget")
    ledger.record_decline(server_round=2, client="b", reason="")
    _client(ledger, 2, "c", 1.0)
    sample = ledger.summary()["sample_level"]
    assert isinstance(sample, dict)
    assert sample["declines"] == 3
    assert sample["clients"] == 1  # declining clients that never trained are not counted
    assert ledger.client_epsilons() == {"c": 1.0}
    assert [d.client for d in ledger.declines] == ["a", "a", "b"]


# ---------------------------------------------------------------- two guarantees, never added


def test_client_level_kept_separate_and_never_added() -> None:
    ledger = _populated()
    summary = ledger.summary()
    sample = summary["sample_level"]
    client_level = summary["client_level"]
    assert isinstance(sample, dict)
    assert isinstance(client_level, dict)
    assert sample["max_epsilon"] == 0.75
    assert client_level == {
        "enabled": True,
        "epsilon": 0.6,
        "delta": DELTA,
        "noise_multiplier": 0.8,
        "clipping_norm": 0.5,
        "num_sampled": 10,
        "population": 100,
        "releases": 3,
        "accounting": "rdp",
        "mechanism": "server-fixed",
        "epsilon_rdp": None,
        "epsilon_pld": None,
        "sensitivity": None,
        "bands": 1,
        "sample_rate": 0.0,
        "clients": 0,
    }
    assert "never added" in str(summary["note"])
    # No number in the summary is a sum of the two guarantees.
    text = json.dumps(summary)
    for combined in (0.75 + 0.6, 0.5 + 0.6, 0.125 + 0.6):
        assert repr(combined) not in text
    assert not any(key in summary for key in ("epsilon", "total_epsilon", "combined"))
    assert 0.6 not in ledger.client_epsilons().values()


# ---------------------------------------------------------------- persistence


def test_dict_round_trip() -> None:
    ledger = _populated()
    data = ledger.to_dict()
    again = PrivacyLedger.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    assert again.summary() == ledger.summary()
    assert again.entries == ledger.entries
    assert again.declines == ledger.declines
    assert again.releases == ledger.releases
    first = data["clients"][0]  # type: ignore[index]
    assert first == {
        "server_round": 1,
        "client": "0",
        "epsilon": 0.5,
        "delta": DELTA,
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "release": "train",
        "steps": 10,
    }


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run" / "privacy.json"
    ledger = _populated()
    ledger.save(path)
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    loaded = PrivacyLedger.load(path)
    assert loaded.to_dict() == ledger.to_dict()
    _client(ledger, 4, "0", 2.0)
    ledger.save(path)
    assert PrivacyLedger.load(path).client_epsilons()["0"] == 2.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["privacy.json"]  # no temp left


def test_truncate_after_for_resume(tmp_path: Path) -> None:
    ledger = _populated()
    ledger.truncate_after(2)
    assert {e.server_round for e in ledger.entries} == {1, 2}
    assert {d.server_round for d in ledger.declines} == {1, 2}
    assert [r.server_round for r in ledger.releases] == [1, 2]
    assert ledger.client_epsilons() == {"0": 0.75, "1": 0.25}
    # The truncated rounds can be recorded again (e.g. a resumed run redoing round 3).
    _client(ledger, 3, "1", 0.3)
    _client_level(ledger, 3, 0.5)
    path = tmp_path / "privacy.json"
    ledger.save(path)
    loaded = PrivacyLedger.load(path)
    assert loaded.to_dict() == ledger.to_dict()
    loaded.truncate_after(0)
    assert loaded.entries == ()
    assert loaded.releases == ()
    assert loaded.client_epsilons() == {}


def test_load_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match=str(path)):
        PrivacyLedger.load(path)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("clients"),
        lambda d: d.update(version=99),
        lambda d: d.update(delta=2.0),
        lambda d: d["clients"][0].pop("steps"),
        lambda d: d["clients"][0].update(extra=1),
        lambda d: d["clients"][2].update(epsilon=0.1),  # client "0" goes backwards
        lambda d: d["client_level_releases"][1].update(server_round=1),
        lambda d: d.update(declines="none"),
    ],
)
def test_load_corrupt_or_inconsistent_file_raises(tmp_path: Path, mutate: Any) -> None:
    data = _populated().to_dict()
    mutate(data)
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError, match=str(path)):
        PrivacyLedger.load(path)


@pytest.mark.parametrize("content", [b"{oops", b"", b"\xff\xfe", b"[1, 2]", b"null"])
def test_load_garbage_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "privacy.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=str(path)):
        PrivacyLedger.load(path)
