"""The dynamic batcher on its own: batch formation, bounds, refusals, timeouts, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pollinate.serving.batcher import (
    Batcher,
    BatcherClosedError,
    OverloadedError,
    RequestTimeoutError,
)


class Model:
    """A real computation (y = 2x + row sum) that records the batch sizes it was given."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.batches: list[int] = []
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self.lock:
            self.batches.append(len(x))
        if self.seconds:
            time.sleep(self.seconds)
        return {"y": 2 * x + x.sum(axis=1, keepdims=True)}


def _reference(x: np.ndarray) -> np.ndarray:
    return np.stack([2 * row + row.sum() for row in x])


async def _run(batcher: Batcher, xs: list[np.ndarray], timeout: float = 5.0) -> list[np.ndarray]:
    futures = [batcher.submit({"x": x}, len(x), timeout) for x in xs]
    return [(await f).outputs["y"] for f in futures]


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    model = Model(seconds=0.002)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 3)).astype(np.float32) for _ in range(60)]

    async def main() -> list[np.ndarray]:
        batcher = Batcher([model], max_batch_size=16, max_queue_delay_s=0.005, max_queue_size=1000)
        batcher.start()
        out = await _run(batcher, xs)
        await batcher.close()
        return out

    outs = asyncio.run(main())
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_allclose(y, _reference(x), rtol=1e-6)
    assert max(model.batches) <= 16
    assert sum(model.batches) == sum(len(x) for x in xs)
    assert len(model.batches) < len(xs) / 3, model.batches


def test_a_lone_request_waits_at_most_the_queue_delay() -> None:
    model = Model()

    async def main() -> float:
        batcher = Batcher([model], max_batch_size=64, max_queue_delay_s=0.05, max_queue_size=64)
        batcher.start()
        started = time.perf_counter()
        result = await batcher.submit({"x": np.ones((1, 3), np.float32)}, 1, 5.0)
        waited = time.perf_counter() - started
        assert result.batch_rows == 1
        await batcher.close()
        return waited

    waited = asyncio.run(main())
    assert 0.045 <= waited < 1.0


def test_full_queue_refuses_at_once_and_timeouts_leave_the_queue() -> None:
    model = Model(seconds=0.2)

    async def main() -> None:
        batcher = Batcher([model], max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=8)
        batcher.start()
        running = batcher.submit({"x": np.ones((4, 3), np.float32)}, 4, 5.0)
        await asyncio.sleep(0.05)  # the first batch is now in the model
        queued = [batcher.submit({"x": np.ones((4, 3), np.float32)}, 4, 0.05) for _ in range(2)]
        assert batcher.queued_rows == 8
        started = time.perf_counter()
        with pytest.raises(OverloadedError, match="8 of 8"):
            batcher.submit({"x": np.ones((1, 3), np.float32)}, 1, 5.0)
        assert time.perf_counter() - started < 0.01
        for f in queued:
            with pytest.raises(RequestTimeoutError):
                await f
        assert batcher.queued_rows == 0  # timed-out requests no longer hold queue space
        again = batcher.submit({"x": np.ones((2, 3), np.float32)}, 2, 5.0)
        assert (await running).outputs["y"].shape == (4, 3)
        assert (await again).outputs["y"].shape == (2, 3)
        await batcher.close()

    asyncio.run(main())
    assert model.batches == [4, 2], "timed-out requests must never reach the model"


def test_close_drains_the_queue_then_refuses() -> None:
    model = Model(seconds=0.01)

    async def main() -> None:
        batcher = Batcher(
            [model, Model(0.01)], max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=100
        )
        batcher.start()
        futures = [batcher.submit({"x": np.full((1, 3), i, np.float32)}, 1, 5.0) for i in range(20)]
        await batcher.close(drain=True)
        assert all(f.done() and f.exception() is None for f in futures)
        with pytest.raises(BatcherClosedError):
            batcher.submit({"x": np.ones((1, 3), np.float32)}, 1, 5.0)

    asyncio.run(main())


def test_a_failing_model_fails_its_batch_only() -> None:
    calls = {"n": 0}

    def flaky(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return {"y": inputs["x"] * 2}

    async def main() -> None:
        batcher = Batcher([flaky], max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=100)
        batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit({"x": np.ones((1, 3), np.float32)}, 1, 5.0)
        ok = await batcher.submit({"x": np.ones((1, 3), np.float32)}, 1, 5.0)
        np.testing.assert_array_equal(ok.outputs["y"], 2 * np.ones((1, 3)))
        await batcher.close()

    asyncio.run(main())


def test_without_a_queue_only_a_free_instance_takes_a_request() -> None:
    """max_queue_size 0: admitted while an instance is free, refused at once otherwise, and
    never held for the queue delay (no other request could join it)."""
    model = Model(seconds=0.2)

    async def main() -> None:
        batcher = Batcher([model, model], max_batch_size=16, max_queue_delay_s=1.0,
                          max_queue_size=0)  # fmt: skip
        batcher.start()
        x = np.ones((4, 3), np.float32)
        assert batcher.admits(4)
        started = time.perf_counter()
        first = batcher.submit({"x": x}, 4, 5.0)
        await asyncio.sleep(0.05)  # the first instance has taken it
        second = batcher.submit({"x": x + 1}, 4, 5.0)
        await asyncio.sleep(0.05)
        assert not batcher.admits(1)  # both instances busy
        with pytest.raises(OverloadedError, match="every model instance is busy"):
            batcher.submit({"x": x}, 4, 5.0)
        np.testing.assert_allclose((await first).outputs["y"], _reference(x), rtol=1e-6)
        assert time.perf_counter() - started < 0.9  # not the 1 s queue delay
        np.testing.assert_allclose((await second).outputs["y"], _reference(x + 1), rtol=1e-6)
        assert batcher.admits(4)  # free again
        await batcher.close()

    asyncio.run(main())
    assert model.batches == [4, 4]


def test_without_a_queue_requests_in_one_loop_turn_take_every_free_instance() -> None:
    """Two requests submitted back to back (no await between them, as when one read of the
    sockets brings both) go to the two free instances at once; the third is refused."""
    first_model, second_model = Model(seconds=0.1), Model(seconds=0.1)

    async def main() -> None:
        batcher = Batcher([first_model, second_model], max_batch_size=16,
                          max_queue_delay_s=0.0, max_queue_size=0)  # fmt: skip
        batcher.start()
        x = np.ones((2, 3), np.float32)
        futures = [batcher.submit({"x": x * (i + 1)}, 2, 5.0) for i in range(2)]
        with pytest.raises(OverloadedError):
            batcher.submit({"x": x}, 2, 5.0)
        started = time.perf_counter()
        outs = [(await f).outputs["y"] for f in futures]
        assert time.perf_counter() - started < 0.19  # ran side by side, not one after another
        for i, y in enumerate(outs):
            np.testing.assert_allclose(y, _reference(x * (i + 1)), rtol=1e-6)
        await batcher.close()

    asyncio.run(main())
    assert first_model.batches == [2] and second_model.batches == [2]


def test_a_batch_started_by_the_delay_takes_what_arrived_meanwhile() -> None:
    """With a delay, requests that arrive before it ends (in later loop turns) join the
    first request's batch; a full batch does not wait for the delay."""
    model = Model()

    async def main() -> None:
        batcher = Batcher([model], max_batch_size=4, max_queue_delay_s=0.03, max_queue_size=64)
        batcher.start()
        x = np.ones((1, 3), np.float32)
        first = batcher.submit({"x": x}, 1, 5.0)
        await asyncio.sleep(0.005)
        second = batcher.submit({"x": x}, 1, 5.0)
        assert (await first).batch_rows == 2 and (await second).batch_rows == 2
        started = time.perf_counter()
        full = [batcher.submit({"x": x}, 1, 5.0) for _ in range(4)]
        assert [(await f).batch_rows for f in full] == [4, 4, 4, 4]
        assert time.perf_counter() - started < 0.025  # a full batch goes at once
        await batcher.close()

    asyncio.run(main())
    assert model.batches == [2, 4]
