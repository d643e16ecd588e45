"""A real device emulating a latency model (``edge run --emulate-latency``) answers when the
simulation's model says it would: same draws, same slow devices, counted per train message."""

from __future__ import annotations

import re
import time

import pytest
from flwr.app import Context, RecordDict

from pollinate.clientapp.latency import answer_late
from pollinate.config.latency import LatencyModel
from pollinate.errors import ConfigError
from pollinate.simulation.latency import SimulatedNetwork

pytestmark = pytest.mark.unit


def test_a_spec_reads_back_the_model_the_simulation_uses() -> None:
    model = LatencyModel.parse("median=2, sigma=0.25,slow-fraction=0.2,slow-factor=5,seed=9")
    assert model == LatencyModel(median_s=2.0, sigma=0.25, slow_fraction=0.2, slow_factor=5.0,
                                 seed=9)  # fmt: skip
    assert LatencyModel.parse(model.spec()) == model
    net = SimulatedNetwork(model)  # the fast engine's draws for device 3: the same numbers
    assert [net.latency(3) for _ in range(4)] == [model.draw(3, n) for n in range(4)]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("sigma=0.5", "median=SECONDS is required"),
        ("median=2,slow=0.1", "'slow=0.1' is not NAME=VALUE"),
        ("median", "'median' is not NAME=VALUE"),
        ("median=fast", "median='fast' is not a number"),
        ("median=-1", "median must be a number >= 0"),
        ("median=1,dropout=1", "dropout must be in [0, 1)"),
        ("median=1,slow-factor=0", "slow-factor must be > 0"),
        ("median=1,seed=-2", "seed must be >= 0"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(
        ConfigError, match=re.escape(f"latency spec {spec!r}") + ".*" + re.escape(says)
    ):
        LatencyModel.parse(spec)


def _device(partition: int, spec: str) -> Context:
    node_config: dict[str, bool | float | int | str] = {"partition-id": partition}
    if spec:
        node_config["emulate-latency"] = spec
    return Context(run_id=1, node_id=partition + 100, node_config=node_config,
                   state=RecordDict(), run_config={})  # fmt: skip


def test_each_train_message_is_answered_when_the_model_says() -> None:
    spec = "median=0.05,sigma=0.3,slow-fraction=0.5,slow-factor=6,seed=4"
    model = LatencyModel.parse(spec)
    slow = next(d for d in range(20) if model.is_slow(d))
    for device in (slow, next(d for d in range(20) if not model.is_slow(d))):
        context = _device(device, spec)
        for nth in range(3):  # the count lives in the run's Context.state, as on a SuperNode
            want = model.draw(device, nth)
            assert want is not None
            received = time.monotonic()
            answer_late(context, received)
            took = time.monotonic() - received
            assert want <= took < want + 0.15, (device, nth, want, took)


def test_a_device_without_a_spec_answers_at_once() -> None:
    context = _device(0, "")
    started = time.monotonic()
    answer_late(context, started)
    assert time.monotonic() - started < 0.05 and "pollinate.latency" not in context.state
