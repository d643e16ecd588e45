"""The paced SuperNode loop (``device/supernode.py``): an active node asks for work every
``poll_s`` instead of Flower's 3 s, an idle one keeps Flower's pace, and bad intervals are
refused. The real SuperNode runs it in every federation test (``pollinate edge run``)."""

from __future__ import annotations

import time

import pytest

from pollinate.device.supernode import (
    FLOWER_IDLE_POLL_S,
    LOCAL_STEP_S,
    PacedTime,
    poll_interval,
)
from pollinate.errors import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def paced(poll_s: float = 0.5, window_s: float = 120.0) -> tuple[PacedTime, FakeClock]:
    clock = FakeClock()
    return PacedTime(poll_s, window_s=window_s, clock=clock, sleep=clock.sleep), clock


def test_an_idle_node_keeps_flowers_pace() -> None:
    pacer, clock = paced()
    for _ in range(3):
        pacer.sleep(FLOWER_IDLE_POLL_S)
    assert clock.slept == [FLOWER_IDLE_POLL_S] * 3
    assert not pacer.active


def test_a_node_that_handled_a_message_asks_again_after_poll_s_then_slows_down() -> None:
    pacer, clock = paced(poll_s=0.25, window_s=10.0)
    pacer.sleep(0.5)  # Flower waits for the ClientApp's reply: the node is active
    assert clock.slept == [LOCAL_STEP_S]
    clock.slept.clear()
    while clock.now < 1000.0 + LOCAL_STEP_S + 10.0:
        pacer.sleep(FLOWER_IDLE_POLL_S)
    assert set(clock.slept) == {0.25} and len(clock.slept) == 40  # 10 s of fast asks
    pacer.sleep(FLOWER_IDLE_POLL_S)  # the window passed: back to Flower's pace
    assert clock.slept[-1] == FLOWER_IDLE_POLL_S


def test_everything_else_is_the_time_module() -> None:
    pacer, _ = paced()
    assert pacer.monotonic is time.monotonic and pacer.time is time.time


@pytest.mark.parametrize("value", ["", None])
def test_the_default_interval(value: str | None) -> None:
    assert poll_interval(value) == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "fast", "3.5", 0.01])
def test_a_bad_interval_is_one_clear_error(value: str | float) -> None:
    with pytest.raises(ConfigError, match=r"poll interval: .* from 0.05 to 3.0 .*--poll-interval"):
        poll_interval(value)
