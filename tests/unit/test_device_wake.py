"""The SuperNode's wake for its warm executor (`device/wake.py`): a FIFO that carries "look
now", never blocks the SuperNode, and cuts the executor's sleep short; and the hooks that put
it into Flower's SuperNode loop and SuperExec loop."""

from __future__ import annotations

import stat
import threading
import time
import types
from pathlib import Path

import pytest

from pollinate.device import warm_executor
from pollinate.device.supernode import wake_on_message
from pollinate.device.wake import WAKE_ENV, WakeableTime, Waker, make_fifo


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    return make_fifo(tmp_path / "executor.wake")


def test_the_fifo_is_private_and_replaces_what_was_there(tmp_path: Path) -> None:
    path = tmp_path / "executor.wake"
    path.write_text("stale")
    make_fifo(path)
    mode = path.stat().st_mode
    assert stat.S_ISFIFO(mode) and stat.S_IMODE(mode) == 0o600


def test_a_wake_nobody_listens_for_is_dropped_at_once(fifo: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    assert Waker(fifo).wake() is False  # no reader: not an error, not a wait
    assert Waker(tmp_path / "missing").wake() is False
    assert time.monotonic() - start < 0.5


def test_a_wake_cuts_the_sleep_short_and_is_taken_once(fifo: Path) -> None:
    clock = WakeableTime(fifo)
    waker = Waker(fifo)
    try:
        start = time.monotonic()
        clock.sleep(0.2)  # nothing came: the whole wait
        assert time.monotonic() - start >= 0.19

        timer = threading.Timer(0.1, waker.wake)
        timer.start()
        start = time.monotonic()
        clock.sleep(30.0)
        timer.join()
        assert 0.05 < time.monotonic() - start < 5.0

        for _ in range(3):  # several wakes before the executor looks: one early return
            assert waker.wake()
        start = time.monotonic()
        clock.sleep(30.0)
        assert time.monotonic() - start < 1.0
        start = time.monotonic()
        clock.sleep(0.2)  # all three were taken by the one look
        assert time.monotonic() - start >= 0.19
        assert clock.monotonic() > 0  # the rest of `time` is time's own
    finally:
        waker.close()
        clock.close()


def test_a_full_fifo_does_not_block_the_supernode(fifo: Path) -> None:
    clock = WakeableTime(fifo)  # a reader that never reads
    waker = Waker(fifo)
    try:
        sent = 0
        start = time.monotonic()
        while waker.wake():
            sent += 1
            assert sent < 1 << 20, "the FIFO never filled"
        assert sent >= 4096 and time.monotonic() - start < 10
        start = time.monotonic()
        clock.sleep(30.0)  # ...and the executor still wakes and drains it
        assert time.monotonic() - start < 1.0
        assert waker.wake()
    finally:
        waker.close()
        clock.close()


def test_the_waker_finds_a_new_executor_after_the_old_one_went(fifo: Path) -> None:
    waker = Waker(fifo)
    first = WakeableTime(fifo)
    assert waker.wake()
    first.close()
    assert waker.wake() is False  # nobody reads now
    second = WakeableTime(fifo)
    try:
        assert waker.wake()
        start = time.monotonic()
        second.sleep(30.0)
        assert time.monotonic() - start < 1.0
    finally:
        waker.close()
        second.close()


def test_only_a_fifo_is_slept_on(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(OSError, match="not a FIFO"):
        WakeableTime(plain)


def test_the_supernode_wakes_its_executor_for_each_message_it_stored(fifo: Path) -> None:
    pulls = iter([None, 7, None, 8])
    loop = types.SimpleNamespace(_pull_and_store_message=lambda **_: next(pulls))
    wakes: list[int] = []

    class Counting(Waker):
        def wake(self) -> bool:
            wakes.append(1)
            return True

    assert wake_on_message(loop, Counting(fifo))
    got = [loop._pull_and_store_message(state=None) for _ in range(4)]
    assert got == [None, 7, None, 8]  # Flower's loop sees what it saw before
    assert len(wakes) == 2  # one per message, none for an empty pull
    assert wake_on_message(types.SimpleNamespace(), Counting(fifo)) is False


def test_the_executor_sleeps_on_the_fifo_only_when_it_can(
    fifo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flower = types.SimpleNamespace(time=time)
    monkeypatch.delenv(WAKE_ENV, raising=False)
    assert warm_executor._listen_for_wakes(flower) is False and flower.time is time
    monkeypatch.setenv(WAKE_ENV, str(tmp_path / "missing"))
    assert warm_executor._listen_for_wakes(flower) is False and flower.time is time
    monkeypatch.setenv(WAKE_ENV, str(fifo))
    assert warm_executor._listen_for_wakes(types.SimpleNamespace()) is False  # loop changed
    assert warm_executor._listen_for_wakes(flower) is True
    assert isinstance(flower.time, WakeableTime)
    flower.time.close()
