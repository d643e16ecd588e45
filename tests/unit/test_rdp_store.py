"""The one-step RDP curves a device keeps beside its ledger (``privacy.rdp.keep_curves_in``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opacus.accountants.rdp import RDPAccountant

from pollinate.device.ledger import DeviceLedger
from pollinate.privacy import ClientAccountant, MechanismStep, rdp

STEP = MechanismStep(noise_multiplier=1.1, sample_rate=0.2, steps=25)
DELTA = 1e-5


def _opacus_epsilon(step: MechanismStep) -> float:
    accountant = RDPAccountant()
    accountant.history = [(step.noise_multiplier, step.sample_rate, step.steps)]
    return float(accountant.get_epsilon(DELTA))


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    """Each test starts as a fresh fork does: nothing cached in memory, no store."""
    rdp._unit_rdp.cache_clear()
    rdp._composed_epsilon.cache_clear()
    yield
    rdp.keep_curves_in(None)
    rdp._unit_rdp.cache_clear()
    rdp._composed_epsilon.cache_clear()


def _forget_in_memory() -> None:
    rdp._unit_rdp.cache_clear()
    rdp._composed_epsilon.cache_clear()


def _refuse_to_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise AssertionError("the curve was computed again instead of read from the store")

    monkeypatch.setattr(rdp._analysis(), "compute_rdp", refuse)


def test_a_later_process_reads_the_curve_and_gets_opacus_epsilon_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / rdp.CURVES_FILE
    rdp.keep_curves_in(store)
    first = ClientAccountant([STEP]).epsilon(DELTA)
    assert store.exists()
    expected = _opacus_epsilon(STEP)
    _forget_in_memory()  # the next message's fork
    _refuse_to_compute(monkeypatch)
    again = ClientAccountant([STEP]).epsilon(DELTA)
    assert again == first == expected


def test_an_unreadable_store_is_ignored_and_rewritten(tmp_path: Path) -> None:
    store = tmp_path / rdp.CURVES_FILE
    store.write_text("{not json")
    rdp.keep_curves_in(store)
    assert ClientAccountant([STEP]).epsilon(DELTA) == _opacus_epsilon(STEP)
    curves = json.loads(store.read_text())["curves"]
    assert list(curves) == [f"{STEP.noise_multiplier!r}/{STEP.sample_rate!r}"]


@pytest.mark.parametrize(
    "stamp",
    [{"opacus": "0.0.1"}, {"orders": [2.0, 3.0]}, {"format": 0}],
    ids=["other-opacus", "other-orders", "other-format"],
)
def test_curves_stamped_for_something_else_are_not_used(
    tmp_path: Path, stamp: dict[str, object]
) -> None:
    # zeros would make the step free: a store from another Opacus or other orders must not count
    key = f"{STEP.noise_multiplier!r}/{STEP.sample_rate!r}"
    store = tmp_path / rdp.CURVES_FILE
    store.write_text(
        json.dumps({**rdp._stamp(), **stamp, "curves": {key: [0.0] * len(rdp._ORDERS)}})
    )
    rdp.keep_curves_in(store)
    assert ClientAccountant([STEP]).epsilon(DELTA) == _opacus_epsilon(STEP) > 1.0


def test_malformed_curves_are_not_used(tmp_path: Path) -> None:
    key = f"{STEP.noise_multiplier!r}/{STEP.sample_rate!r}"
    store = tmp_path / rdp.CURVES_FILE
    for bad in ([0.0] * 3, [-1.0] * len(rdp._ORDERS), ["0"] * len(rdp._ORDERS)):
        store.write_text(json.dumps({**rdp._stamp(), "curves": {key: bad}}))
        rdp.keep_curves_in(store)
        _forget_in_memory()
        assert ClientAccountant([STEP]).epsilon(DELTA) == _opacus_epsilon(STEP)


def test_a_devices_ledger_keeps_the_curves_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = DeviceLedger(tmp_path / "device")
    ledger.identity()
    accountant = ledger.load()
    projected = accountant.projected_epsilon(STEP, DELTA)
    assert (tmp_path / "device" / rdp.CURVES_FILE).exists()
    _forget_in_memory()
    _refuse_to_compute(monkeypatch)
    assert DeviceLedger(tmp_path / "device").load().projected_epsilon(STEP, DELTA) == projected
